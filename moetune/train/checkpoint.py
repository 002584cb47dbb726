"""Training checkpoints: adapters, optimizer, scheduler, RNG states, data position and AdaLoRA's
rank-allocator state (importance EMAs and masks).

A checkpoint is a folder ``checkpoint-00000012`` written first as a hidden temporary folder
and renamed into place when complete, so a kill at any moment leaves every earlier checkpoint
intact and never a half-written one under a real name. Tensors go to safetensors; optimizer and
RNG state use ``torch.save`` and are read back with ``weights_only=True`` (no arbitrary
unpickling). Checkpoints written before the allocator state was saved load with ``allocators``
empty; the trainer warns and resumes without it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

NAME = re.compile(r"^checkpoint-(\d{8})$")


@dataclass
class TrainState:
    """Everything needed to continue a run exactly."""

    step: int
    adapters: dict[str, dict[str, torch.Tensor]]  # adapter name -> {param key: tensor}
    optimizers: dict[str, dict]
    schedulers: dict[str, dict]
    data: dict[str, Any]
    rng: dict[str, Any]
    extra: dict[str, Any]
    allocators: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # AdaLoRA adapter -> state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | os.PathLike, state: TrainState, *, keep_last: int = 2) -> Path:
    """Write ``root/checkpoint-<step>`` atomically, then drop all but the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=root))
    try:
        for prefix, groups in (("adapter", state.adapters), ("allocator", state.allocators)):
            for name, tensors in groups.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{prefix}-{name}.safetensors"))
        torch.save({"optimizers": state.optimizers, "schedulers": state.schedulers, "rng": state.rng}, tmp / "trainer_state.pt")
        meta = {"step": state.step, "data": state.data, "extra": state.extra, "adapters": sorted(state.adapters),
                "allocators": sorted(state.allocators)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and NAME.match(p.name))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> TrainState:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"'{path}' is not a moetune training checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
        adapters = {n: load_file(str(path / f"adapter-{n}.safetensors")) for n in meta["adapters"]}
        allocators = {n: load_file(str(path / f"allocator-{n}.safetensors")) for n in meta.get("allocators", [])}
        trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    except (OSError, KeyError, json.JSONDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({exc})") from None
    return TrainState(step=meta["step"], adapters=adapters, optimizers=trainer["optimizers"], schedulers=trainer["schedulers"], data=meta["data"], rng=trainer["rng"], extra=meta.get("extra", {}), allocators=allocators)
