"""Command line: parses arguments, then calls one library function per subcommand.

User mistakes (MoetuneError) print one line and exit 2; anything else is a bug and keeps its
traceback. The subcommands live in :mod:`.training` and :mod:`.inference`, the options they share in
:mod:`.options`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ..errors import MoetuneError
from .inference import add_eval, add_export, add_generate, add_merge, add_merge_adapters
from .options import Help, Parser, package_version
from .training import add_demo, add_inspect, add_train

Handler = Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: list[Callable] = [
    add_train,
    add_eval,
    add_generate,
    add_merge,
    add_merge_adapters,
    add_export,
    add_inspect,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moetune",
        formatter_class=Help,
        description="LoRA-family fine-tuning of Mixture-of-Experts language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"moetune {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; config overrides (``key.sub=value``) may also follow the flags, as in
    ``moetune train run.yaml --overwrite optim.lr=1e-4`` (argparse alone stops collecting them at
    the first flag)."""
    ns, extra = parser.parse_known_args(argv)
    if extra and hasattr(ns, "overrides") and all("=" in t and not t.startswith("-") for t in extra):
        ns.overrides = [*ns.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parse_command_line(parser, argv)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(ns, "handler", None):
        parser.print_help()
        return 2
    from ..signals import Terminated, sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM: Terminated, as SIGINT is KeyboardInterrupt
            return ns.handler(ns) or 0
    except MoetuneError as exc:
        print(f"moetune {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # training says where its checkpoint is
        print(f"moetune {ns.command}: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"moetune {ns.command}: terminated" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 143


def run() -> None:
    """The ``moetune`` command: :func:`main`'s status as the process's (see :mod:`...train.teardown`)."""
    from ..train.teardown import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
