"""Command line: parses arguments, then calls one library function per subcommand.

User mistakes (MoetuneError) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .errors import MoetuneError

Handler = Callable[[argparse.Namespace], int | None]


def _cmd_inspect(ns: argparse.Namespace) -> None:
    from .inspect import inspect_model

    print(inspect_model(ns.path))


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a Hugging Face model folder", description="Print family, layer/expert counts, parameter counts (total and active per token) and the module names adapters can target.")
    p.add_argument("path", help="local model folder (config.json + *.safetensors)")
    p.set_defaults(handler=_cmd_inspect)


def _cmd_demo(ns: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out_dir=ns.out, quick=ns.quick)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny MoE and a LoRA adapter on built-in data (CPU, ~3 min)", description="Build a tiny MoE model, give it a base skill on built-in data, LoRA-fine-tune it on a task it cannot do, and print base vs adapted accuracy.")
    p.add_argument("--out", default="moetune-demo", help="output folder (default: ./moetune-demo)")
    p.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    p.set_defaults(handler=_cmd_demo)


SUBCOMMANDS: list[Callable] = [_add_demo, _add_inspect]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetune", description="LoRA-family fine-tuning of Mixture-of-Experts language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(ns, "handler", None):
        parser.print_help()
        return 2
    try:
        return ns.handler(ns) or 0
    except MoetuneError as exc:
        print(f"moetune {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moetune {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
