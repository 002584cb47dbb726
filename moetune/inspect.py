"""``moetune inspect``: what a checkpoint folder holds and what adapters can target."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model.build import build_causal_lm
from .model.families import model_args_from_hf
from .model.loading import read_hf_config, weight_files
from .model.summary import summarize


def target_names(args) -> tuple[list[str], dict[str, list[str]]]:
    """Module-name suffixes an adapter config may list for this model, and the Megatron-style
    aliases that apply to it (alias -> the Hugging Face names it selects here)."""
    from .peft.inject import alias_map, targetable_names

    with torch.device("meta"):
        model = build_causal_lm(args)
    return targetable_names(model), alias_map(model)


def inspect_model(path: str | os.PathLike) -> str:
    """A readable report of a model folder; reads config.json and the file list only."""
    cfg = read_hf_config(path)
    args = model_args_from_hf(cfg, where=os.path.join(str(path), "config.json"))
    files = weight_files(Path(path))
    lines = [f"model             {path}"] + summarize(args).lines()
    lines.append(f"weights           {len(files)} safetensors file(s)")
    try:
        names, aliases = target_names(args)
    except ImportError:  # peft layer not available
        names, aliases = [], {}
    if names:
        lines.append("adapter targets   " + ", ".join(names))
    if aliases:
        width = max(len(a) for a in aliases)
        lines.append("target aliases    (Megatron-style names accepted in target_modules)")
        lines += [f"  {a:<{width}} -> {' + '.join(t)}" for a, t in aliases.items()]
    return "\n".join(lines)
