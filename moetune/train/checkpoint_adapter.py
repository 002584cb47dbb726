"""A training checkpoint (``<run>/checkpoints/checkpoint-N``) used as an adapter, for ``eval`` and
``generate`` in the middle of a run.

A checkpoint holds the adapter's tensors under moetune's parameter names; what the adapter *is*
(method, rank, alpha, targets) comes from the run's resolved config, which every run writes to
:data:`RUN_CONFIG` in its output folder. The adapter is added as that config says, then its tensors
are copied in, each checked by name and shape.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from torch import nn

from ..config import TrainConfig, from_dict
from ..errors import AdapterError
from ..peft.core.inject import add_adapter
from ..peft.formats.adapters import load_adapter
from .checkpoint import NAME, load_checkpoint
from ..peft.core.params import adapter_parameters
from .run_folder import RUN_CONFIG


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    folder = Path(path)
    return bool(NAME.match(folder.name)) and (folder / "meta.json").is_file()


def _run_config(checkpoint: Path) -> TrainConfig:
    source = checkpoint.parent.parent / RUN_CONFIG
    if not source.is_file():
        raise AdapterError(
            f"'{checkpoint}' is a training checkpoint, but its run folder has no {RUN_CONFIG} (a run "
            "from an earlier moetune): give the run's adapter folder instead"
        )
    try:
        return from_dict(TrainConfig, yaml.safe_load(source.read_text()), where=str(source))
    except yaml.YAMLError as exc:
        raise AdapterError(f"{source}: not valid YAML ({exc})") from None


def load_checkpoint_adapter(model: nn.Module, path: str | os.PathLike) -> str:
    """Add the one adapter a training checkpoint holds to ``model`` with its trained tensors (and,
    beneath it, the earlier adapters the run stacked it on); returns its name (the run's)."""
    checkpoint = Path(path)
    config, state = _run_config(checkpoint), load_checkpoint(checkpoint)
    if len(state.adapters) != 1:
        raise AdapterError(
            f"'{checkpoint}' holds {len(state.adapters)} adapters ({', '.join(sorted(state.adapters))}); "
            "give one adapter's folder instead"
        )
    ((trained, tensors),) = state.adapters.items()
    for section in config.adapters:
        if section.path is not None:  # an earlier adapter it was stacked on: active beneath it
            load_adapter(model, section.path, name=section.name)
    section = next(s for s in config.adapters if s.name == trained)
    add_adapter(model, section.to_lora_config(), name=trained)
    params = adapter_parameters(model, trained)
    missing = sorted(set(params) ^ set(tensors))
    if missing:
        raise AdapterError(f"'{checkpoint}': adapter tensor '{missing[0]}' does not match the run's config")
    with torch.no_grad():
        for key, p in params.items():
            if tensors[key].shape != p.shape:
                raise AdapterError(
                    f"'{checkpoint}': tensor '{key}' has shape {tuple(tensors[key].shape)}, the config makes "
                    f"{tuple(p.shape)}"
                )
            p.copy_(tensors[key])
    return trained
