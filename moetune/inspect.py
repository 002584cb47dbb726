"""``moetune inspect``: what a checkpoint folder holds and what adapters can target."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError
from .model.build import build_causal_lm
from .model.loading import model_args_from_folder, read_hf_config, weight_files
from .model.prequantized import stored_summary
from .model.summary import summarize
from .model.wrappers import WRAPPERS
from .safetensors_check import safetensors_problem


def target_names(args) -> tuple[list[str], dict[str, list[str]]]:
    """Module-name suffixes an adapter config may list for this model, and the Megatron-style
    aliases that apply to it (alias -> the Hugging Face names it selects here)."""
    from .peft.core.targets import alias_map, targetable_names

    with torch.device("meta"):
        model = build_causal_lm(args)
    return targetable_names(model), alias_map(model)


def inspect_model(path: str | os.PathLike) -> str:
    """A readable report of a model folder; reads config.json, the file list and each weight file's
    header (no tensor data).

    Raises:
        CheckpointError: a weight file is empty, truncated or not safetensors (all such files named).
    """
    args = model_args_from_folder(path)
    files = weight_files(Path(path))
    check_weight_files(files, Path(path))
    lines = [f"model             {path}"] + summarize(args).lines()
    if args.wrapper:
        lines.append(f"wrapper           {args.wrapper}: its text model is loaded, the vision parts are skipped")
    size = sum(f.stat().st_size for f in files)
    lines.append(
        f"weights           {len(files)} safetensors file(s), {size / 2**20:,.1f} MiB (headers and sizes checked)"
    )
    stored = stored_summary(read_hf_config(path), Path(path), files, args.family, WRAPPERS.get(args.wrapper))
    lines.append(f"quantization      {stored}")
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


def check_weight_files(files: list[Path], folder: Path) -> None:
    """Raise one error naming every weight file whose header or size is wrong."""
    broken = [(f, p) for f in files if (p := safetensors_problem(f))]
    if broken:
        listed = "; ".join(f"'{f}' {p}" for f, p in broken)
        raise CheckpointError(f"'{folder}': {len(broken)} of {len(files)} weight files are broken: {listed}")
