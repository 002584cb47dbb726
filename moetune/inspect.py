"""``moetune inspect``: what a checkpoint folder holds and what adapters can target."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model.build import build_causal_lm
from .model.families import model_args_from_hf
from .model.loading import read_hf_config, weight_files
from .model.summary import summarize


def target_names(args) -> list[str]:
    """Module-name suffixes an adapter config may list for this model."""
    from .peft.inject import targetable_names

    with torch.device("meta"):
        model = build_causal_lm(args)
    return targetable_names(model)


def inspect_model(path: str | os.PathLike) -> str:
    """A readable report of a model folder; reads config.json and the file list only."""
    cfg = read_hf_config(path)
    args = model_args_from_hf(cfg, where=os.path.join(str(path), "config.json"))
    files = weight_files(Path(path))
    lines = [f"model             {path}"] + summarize(args).lines()
    lines.append(f"weights           {len(files)} safetensors file(s)")
    try:
        names = target_names(args)
    except ImportError:  # peft layer not available
        names = []
    if names:
        lines.append("adapter targets   " + ", ".join(names))
    return "\n".join(lines)
