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
    p = sub.add_parser(
        "inspect",
        formatter_class=_Help,
        help="describe a Hugging Face model folder",
        description="Print family, layer/expert counts, parameter counts (total and active per token) and the "
        "module names adapters can target.",
    )
    p.add_argument("path", help="local model folder (config.json + *.safetensors)")
    p.set_defaults(handler=_cmd_inspect)


def _cmd_demo(ns: argparse.Namespace) -> None:
    if ns.mixlora:
        from .demo_mixlora import run_comparison

        base_steps, steps = (600, 80) if ns.quick else (1200, 200)
        out = "moetune-mixlora-demo" if ns.out == "moetune-demo" else ns.out  # not over the MoE demo's base
        run_comparison(out, base_steps=base_steps, steps=steps, overwrite=ns.overwrite)
        return
    from .demo import run_demo

    run_demo(out_dir=ns.out, quick=ns.quick, overwrite=ns.overwrite)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=_Help,
        help="train a tiny MoE and a LoRA adapter on built-in data (CPU, ~3 min)",
        description="Build a tiny MoE model, give it a base skill on built-in data, LoRA-fine-tune it on a task it "
        "cannot do, and print base vs adapted accuracy.",
    )
    p.add_argument("--out", default="moetune-demo", help="output folder (default: ./moetune-demo)")
    p.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    p.add_argument(
        "--mixlora",
        action="store_true",
        help="instead: MixLoRA next to a same-size LoRA on a tiny dense base, trained together",
    )
    _overwrite_arg(p)
    p.set_defaults(handler=_cmd_demo)


def _cmd_train(ns: argparse.Namespace) -> None:
    from .workflows import train_from_file

    text = train_from_file(
        ns.config, ns.overrides, resume=ns.resume, overwrite=ns.overwrite, print_config=ns.print_config
    )
    if text is not None:
        print(text, end="" if ns.print_config else "\n")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=_Help,
        help="train adapter(s) from a YAML config",
        description="Train LoRA-family adapters as a YAML config says. Override any key with key.sub=value. "
        "Relative paths in the YAML file resolve against the folder the YAML file is in; relative "
        "paths given as overrides on the command line resolve against the current folder. "
        "checkpoint.output_dir must be new or empty, or hold this run (--resume / --overwrite).",
    )
    p.add_argument("config", help="YAML run config (see examples/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=1e-4 adapter.r=16"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="resume from the latest checkpoint of this run, or from PATH",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds a run (deletes only that run's own files), "
        "or write beside files moetune did not write (never touching them)",
    )
    p.set_defaults(handler=_cmd_train)


def _overwrite_arg(p) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder moetune did not write, beside its "
        "files (never replacing or deleting them); moetune's own earlier output of the same kind is replaced "
        "without it",
    )


def _model_args(
    p,
    *,
    adapter_required: bool = False,
    tokenizer: str | None = "'byte' or a tokenizer folder (default: the model folder's, else byte)",
) -> None:
    p.add_argument("--model", required=True, help="base model folder (Hugging Face layout)")
    p.add_argument(
        "--adapter",
        required=adapter_required,
        help="adapter folder (PEFT layout), or a training checkpoint folder (<run>/checkpoints/checkpoint-N)",
    )
    if tokenizer:
        p.add_argument("--tokenizer", help=tokenizer)
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="weights dtype (auto: the checkpoint's own)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a {'whole number' if kind is int else 'number'}, got {text!r}"
        ) from None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moetune")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """A user mistake on the command line is one line on stderr (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in its help (booleans and unset options aside)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _cmd_eval(ns: argparse.Namespace) -> None:
    from .errors import ConfigError
    from .workflows import evaluate_file, evaluate_task_files

    if not ns.data and not ns.task:
        raise ConfigError("give --data FILE (loss/perplexity) and/or --task FILE (multiple-choice accuracy)")
    if ns.data:
        print(
            evaluate_file(
                ns.model,
                ns.data,
                adapter=ns.adapter,
                tokenizer=ns.tokenizer,
                max_length=ns.max_length,
                batch_size=ns.batch_size,
                dtype=ns.dtype,
                device=ns.device,
            ).summary()
        )
    for result in evaluate_task_files(
        ns.model,
        ns.task or [],
        adapter=ns.adapter,
        tokenizer=ns.tokenizer,
        max_length=ns.max_length,
        batch_size=ns.batch_size,
        chat=ns.chat,
        dtype=ns.dtype,
        device=ns.device,
    ):
        print(result.summary())


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        formatter_class=_Help,
        help="loss / perplexity, or multiple-choice accuracy, of base or base+adapter",
        description="Token-weighted loss and perplexity on a JSONL dataset (instruction, chat or text rows), and/or "
        "multiple-choice accuracy by log-likelihood on task files (rows: question, choices, answer). Router "
        "statistics (expert load, entropy) are printed for MoE layers and adapter mixtures.",
    )
    _model_args(p)
    p.add_argument("--data", help="JSONL file for loss / perplexity")
    p.add_argument(
        "--task",
        action="append",
        metavar="FILE.jsonl",
        help="multiple-choice task file (repeat for several); reports accuracy_norm (headline) and accuracy",
    )
    p.add_argument(
        "--chat", action="store_true", help="--task: ask each question as a chat user turn (chat-tuned adapters)"
    )
    p.add_argument(
        "--max-length", type=_positive_int, default=1024, help="tokens per row (longer rows are cut, and counted)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=8, help="rows per forward pass")
    p.set_defaults(handler=_cmd_eval)


def _cmd_generate(ns: argparse.Namespace) -> None:
    from .workflows import generate_text

    for text in generate_text(
        ns.model,
        ns.prompt,
        adapter=ns.adapter,
        tokenizer=ns.tokenizer,
        chat=not ns.raw,
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        seed=ns.seed,
        dtype=ns.dtype,
        device=ns.device,
    ):
        print(text)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        formatter_class=_Help,
        help="generate text from a prompt (greedy or sampled, KV cache)",
        description="Continue prompts with the base model or base + adapter.",
    )
    _model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate at most per prompt")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument(
        "--top-p",
        type=_probability,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens with this much probability",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(handler=_cmd_generate)


def _cmd_merge(ns: argparse.Namespace) -> None:
    from .workflows import merge_to_checkpoint

    out = merge_to_checkpoint(
        ns.model, ns.adapter, ns.out, tokenizer=ns.tokenizer, dtype=ns.dtype, device=ns.device, overwrite=ns.overwrite
    )
    print(f"merged checkpoint written to {out}")


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        formatter_class=_Help,
        help="fold an adapter into the base; write a Hugging Face checkpoint",
        description="Merge an adapter into the base weights and save a plain Hugging Face checkpoint.",
    )
    _model_args(
        p,
        adapter_required=True,
        tokenizer="a tokenizer folder whose files are copied into the merged folder "
        "(default: the base folder's tokenizer, chat template and generation config)",
    )
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier merge's")
    _overwrite_arg(p)
    p.set_defaults(handler=_cmd_merge)


def _cmd_export(ns: argparse.Namespace) -> None:
    from .workflows import export_adapter

    out = export_adapter(
        ns.model, ns.adapter, ns.out, layout=ns.layout, dtype=ns.dtype, device=ns.device, overwrite=ns.overwrite
    )
    print(f"adapter written to {out} ({ns.layout} layout)")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        formatter_class=_Help,
        help="re-save an adapter in PEFT or per-expert (vLLM) layout",
        description="Write an adapter in PEFT's layout or with per-expert 2D keys (the layout vLLM and SGLang read).",
    )
    _model_args(p, adapter_required=True, tokenizer=None)  # an adapter folder carries no tokenizer
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export's")
    _overwrite_arg(p)
    p.add_argument(
        "--layout",
        choices=["peft", "per_expert", "moe_peft"],
        default="peft",
        help="moe_peft: MoE-PEFT's MixLoRA layout (MixLoRA adapters)",
    )
    p.set_defaults(handler=_cmd_export)


def _cmd_merge_adapters(ns: argparse.Namespace) -> None:
    from .workflows import combine_adapters

    print(
        combine_adapters(
            ns.model,
            ns.adapter,
            ns.out,
            weights=ns.weights,
            method=ns.method,
            density=ns.density,
            rank=ns.rank,
            seed=ns.seed,
            overwrite=ns.overwrite,
        )
    )


def _add_merge_adapters(sub) -> None:
    from .workflows import COMBINE_METHODS as METHODS

    p = sub.add_parser(
        "merge-adapters",
        formatter_class=_Help,
        help="combine adapters of one base into a new adapter (linear, TIES, DARE, SVD ...)",
        description="Merge LoRA adapters trained on the same base model into one PEFT-format adapter "
        "(PEFT's add_weighted_adapter methods; routed experts merged expert by expert).",
    )
    p.add_argument(
        "--model", required=True, help="the base model folder the adapters were trained on (only config.json is read)"
    )
    p.add_argument("--adapter", action="append", required=True, help="adapter folder (repeat, two or more)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1.0 each)")
    p.add_argument("--method", choices=METHODS, default="linear", help="merge method (default: linear)")
    p.add_argument("--density", type=_fraction, help="fraction kept by ties / dare / magnitude_prune methods")
    p.add_argument(
        "--rank", type=_positive_int, help="output rank of the *svd methods (default: the largest input rank)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    p.add_argument("--out", required=True, help="output adapter folder: new, empty, or an earlier adapter's")
    _overwrite_arg(p)
    p.set_defaults(handler=_cmd_merge_adapters)


SUBCOMMANDS: list[Callable] = [
    _add_train,
    _add_eval,
    _add_generate,
    _add_merge,
    _add_merge_adapters,
    _add_export,
    _add_inspect,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moetune",
        formatter_class=_Help,
        description="LoRA-family fine-tuning of Mixture-of-Experts language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"moetune {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(ns, "handler", None):
        parser.print_help()
        return 2
    from .signals import Terminated, sigterm_raises

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


if __name__ == "__main__":
    sys.exit(main())
