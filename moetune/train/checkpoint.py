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
import logging
import os
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..markers import read_marker
from ..outputs import write_folder
from ..removal import describe_kept, remove_ours
from ..safetensors_check import safetensors_problem

log = logging.getLogger(__name__)

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


def save_checkpoint(
    root: str | os.PathLike, state: TrainState, *, keep_last: int = 2, run_id: str | None = None
) -> Path:
    """Write ``root/checkpoint-<step>`` atomically, then drop all but the newest ``keep_last`` of
    run ``run_id`` (checkpoints of other runs, or without a run id, are never pruned)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        for prefix, groups in (("adapter", state.adapters), ("allocator", state.allocators)):
            for name, tensors in groups.items():
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    str(tmp / f"{prefix}-{name}.safetensors"),
                )
        torch.save(
            {"optimizers": state.optimizers, "schedulers": state.schedulers, "rng": state.rng}, tmp / "trainer_state.pt"
        )
        meta = {
            "step": state.step,
            "data": state.data,
            "extra": state.extra,
            "adapters": sorted(state.adapters),
            "allocators": sorted(state.allocators),
            "run_id": run_id,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    final = write_folder(root / f"checkpoint-{state.step:08d}", "checkpoint", write, key="checkpoint")
    if run_id is not None:
        _prune(root, keep_last, run_id)
    return final


def _prune(root: Path, keep_last: int, run_id: str) -> None:
    ours = [p for p in list_checkpoints(root) if checkpoint_run_id(p) == run_id]
    for old in ours[:-keep_last] if keep_last > 0 else []:
        try:
            kept = remove_ours(old)  # a file the user put into an old checkpoint stays, with the folder
        except OSError as e:  # a checkpoint that cannot be pruned must not end hours of training
            log.warning("could not remove old checkpoint %s: %s", old, e)
            continue
        if kept:
            log.warning("pruning %s: %s", old, describe_kept(kept))


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote checkpoint ``path`` (None: unreadable or written before run ids)."""
    try:
        return json.loads((path / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and NAME.match(p.name) and not _emptied(p))


def _emptied(path: Path) -> bool:
    """A checkpoint whose files moetune removed, left for someone's file in it (``removal``)."""
    marker = read_marker(path)
    return marker is not None and marker.kind == "checkpoint" and not marker.files


def latest_checkpoint(root: str | os.PathLike, *, run_id: str | None = None) -> Path | None:
    """The newest checkpoint under ``root``; with ``run_id``, the newest not known to be another run's
    (an unreadable one still counts, so resuming reports it rather than silently skipping it)."""
    found = list_checkpoints(root)
    if run_id is not None:
        found = [p for p in found if checkpoint_run_id(p) in (run_id, None)]
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> TrainState:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the folder is not a checkpoint, or a file in it is missing or unreadable (the
            message names the file and what is wrong, and offers the newest earlier checkpoint of the
            same folder that looks whole).
    """
    path = Path(path)
    try:
        return _read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_previous_hint(path)}") from None


def _read_checkpoint(path: Path) -> TrainState:
    meta = _read_meta(path)
    adapters = {n: _read_tensors(path, path / f"adapter-{n}.safetensors") for n in meta["adapters"]}
    allocators = {n: _read_tensors(path, path / f"allocator-{n}.safetensors") for n in meta.get("allocators", [])}
    return TrainState(
        step=meta["step"],
        data=meta["data"],
        extra=meta.get("extra", {}),
        adapters=adapters,
        allocators=allocators,
        **_read_trainer_state(path),
    )


def _read_meta(path: Path) -> dict[str, Any]:
    """``meta.json``: step, data position, adapter names (checked present), extra."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"'{path}' is not a moetune training checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
        for key in ("step", "data", "adapters"):
            meta[key]  # missing (KeyError) or not an object (TypeError): said below
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        why = (
            f"has no '{exc.args[0]}'"
            if isinstance(exc, KeyError)
            else "is not a JSON object"
            if isinstance(exc, TypeError)
            else f"is not valid JSON ({exc})"
        )
        raise CheckpointError(f"checkpoint '{path}' is unreadable ('{meta_file}' {why})") from None
    return meta


def _read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.pt``: the :class:`TrainState` fields it holds (optimizers, schedulers, rng)."""
    state_file = path / "trainer_state.pt"
    try:
        if state_file.is_file() and state_file.stat().st_size == 0:
            raise EOFError("empty file")
        trainer = torch.load(state_file, weights_only=True)
        return {key: trainer[key] for key in ("optimizers", "schedulers", "rng")}
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        why = (
            "does not exist"
            if not state_file.is_file()
            else f"is damaged ({type(exc).__name__}: {_first_sentence(exc)})"
        )
        raise CheckpointError(f"checkpoint '{path}' is unreadable ('{state_file}' {why})") from None


def _read_tensors(path: Path, file: Path) -> dict[str, torch.Tensor]:
    problem = safetensors_problem(file)
    if problem is None:
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, RuntimeError) as exc:
            problem = f"cannot be read ({_first_sentence(exc)})"
    raise CheckpointError(f"checkpoint '{path}' is unreadable ('{file}' {problem})")


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    return text.split(". ", 1)[0][:300]


def _previous_hint(path: Path) -> str:
    """For a broken ``checkpoint-N``: the newest earlier checkpoint beside it that looks whole."""
    if not NAME.match(path.name):
        return ""
    earlier = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    whole = [p for p in earlier if _looks_whole(p)]
    if whole:
        return (
            f"; the previous checkpoint is '{whole[-1]}' (train --resume {whole[-1]} continues the run from it; "
            "eval and generate take it as --adapter)"
        )
    if earlier:
        return f"; the earlier checkpoints in '{path.parent}' are unreadable too"
    return f"; there is no earlier checkpoint in '{path.parent}'"


def _looks_whole(path: Path) -> bool:
    """Cheap check (meta.json, safetensors headers and sizes, a non-empty trainer state), not a full read."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        files = [f"adapter-{n}.safetensors" for n in meta["adapters"]] + [
            f"allocator-{n}.safetensors" for n in meta.get("allocators", [])
        ]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False
    state = path / "trainer_state.pt"
    return state.is_file() and state.stat().st_size > 0 and all(safetensors_problem(path / f) is None for f in files)
