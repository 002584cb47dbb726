"""Options shared by the subcommands: model/adapter/dtype/device arguments, --overwrite, number
types that refuse bad values in one line, and the parser and help classes."""

from __future__ import annotations

import argparse

OVERWRITE_HELP = (
    "write into a non-empty folder moetune did not write, beside its files (never replacing or deleting them); "
    "moetune's own earlier output of the same kind is replaced without it"
)


def flag(p, name: str, text: str) -> None:
    """An on/off option, off unless given; ``text`` is its help."""
    p.add_argument(name, action="store_true", help=text)


def overwrite_arg(p, text: str = OVERWRITE_HELP) -> None:
    flag(p, "--overwrite", text)


def model_args(
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


def positive_int(text: str) -> int:
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text, float)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    value = number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def number(text: str, kind: type):
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


class Parser(argparse.ArgumentParser):
    """A user mistake on the command line is one line on stderr (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in its help (booleans and unset options aside)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def command(sub, name: str, handler, texts: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: its (help, description) from ``texts``, defaults shown in
    its help, ``handler`` called with the parsed arguments."""
    short, description = texts[name]
    parser = sub.add_parser(name, formatter_class=Help, help=short, description=description)
    parser.set_defaults(handler=handler)
    # also after the command (moetune train -v ...); unset here, so the top-level flag still counts
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    return parser
