"""The training-side subcommands: ``train``, ``demo``, ``inspect``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import command, flag, overwrite_arg

TEXTS = {  # subcommand: (help line, description)
    "train": (
        "train adapter(s) from a YAML config",
        "Train LoRA-family adapters as a YAML config says. Override any key with key.sub=value. "
        "Relative paths in the YAML file resolve against the folder the YAML file is in; relative "
        "paths given as overrides on the command line resolve against the current folder. "
        "checkpoint.output_dir must be new or empty, or hold this run (--resume / --overwrite).",
    ),
    "demo": (
        "train a tiny MoE and a LoRA adapter on built-in data (CPU, ~3 min)",
        "Build a tiny MoE model, give it a base skill on built-in data, LoRA-fine-tune it on a task it "
        "cannot do, and print base vs adapted accuracy.",
    ),
    "inspect": (
        "describe a Hugging Face model folder",
        "Print family, layer/expert counts, parameter counts (total and active per token) and the "
        "module names adapters can target.",
    ),
}


def _cmd_train(ns: argparse.Namespace) -> None:
    from ..workflows import train_from_file

    if isinstance(ns.resume, str) and "=" in ns.resume and not Path(ns.resume).exists():
        # "--resume optim.max_steps=8": argparse gives the override to --resume as its PATH
        ns.overrides, ns.resume = [*ns.overrides, ns.resume], True
    text = train_from_file(
        ns.config, ns.overrides, resume=ns.resume, overwrite=ns.overwrite, print_config=ns.print_config
    )
    if text is not None:
        print(text, end="" if ns.print_config else "\n")


def add_train(sub) -> None:
    p = command(sub, "train", _cmd_train, TEXTS)
    p.add_argument("config", help="YAML run config (see examples/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=1e-4 adapter.r=16"
    )
    flag(p, "--print-config", "print the resolved config and exit")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="resume from the latest checkpoint of this run, or from PATH (a key=value after it is an override)",
    )
    overwrite_arg(
        p,
        "start over in an output_dir that holds a run (deletes only that run's own files), "
        "or write beside files moetune did not write (never touching them)",
    )


def _cmd_demo(ns: argparse.Namespace) -> None:
    if ns.mixlora:
        from ..demo_mixlora import run_comparison

        base_steps, steps = (600, 80) if ns.quick else (1200, 200)
        out = "moetune-mixlora-demo" if ns.out == "moetune-demo" else ns.out  # not over the MoE demo's base
        run_comparison(out, base_steps=base_steps, steps=steps, overwrite=ns.overwrite)
        return
    from ..demo import run_demo

    run_demo(out_dir=ns.out, quick=ns.quick, overwrite=ns.overwrite)


def add_demo(sub) -> None:
    p = command(sub, "demo", _cmd_demo, TEXTS)
    p.add_argument("--out", default="moetune-demo", help="output folder")
    flag(p, "--quick", "fewer steps (smoke test)")
    flag(p, "--mixlora", "instead: MixLoRA next to a same-size LoRA on a tiny dense base, trained together")
    overwrite_arg(p)


def _cmd_inspect(ns: argparse.Namespace) -> None:
    from ..inspect import inspect_model

    print(inspect_model(ns.path))


def add_inspect(sub) -> None:
    p = command(sub, "inspect", _cmd_inspect, TEXTS)
    p.add_argument("path", help="local model folder (config.json + *.safetensors)")
