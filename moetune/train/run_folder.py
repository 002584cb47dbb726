"""A training run's output folder: started new, continued (``--resume``) or started over (``--overwrite``).

Everything a run writes into ``checkpoint.output_dir`` is claimed through an
:class:`~moetune.outputs.OwnedFolder` whose marker also carries the run's id, so:

- a folder holding a run is refused unless the user says ``--resume`` or ``--overwrite``;
- ``--overwrite`` deletes exactly the entries the earlier run recorded, nothing the user put there;
- checkpoints carry the run id, so pruning and ``--resume`` only ever see this run's checkpoints.

Every check here reads only; :func:`open_run_folder` is the first write, after the model, data and
optional dependencies are known to be fine. A run folder from a moetune version that wrote no marker
(checkpoints without one) is refused, or adopted with ``--resume``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig, dump_config
from ..errors import CheckpointError, ConfigError
from ..outputs import (
    MARKER,
    Marker,
    OutputError,
    OwnedFolder,
    check_output,
    new_run_id,
    open_folder,
    read_marker,
    refuse_collisions,
    write_marker,
    write_text_atomic,
)
from .checkpoint import latest_checkpoint, list_checkpoints

KEY = "checkpoint.output_dir"
RUN_CONFIG = "moetune_run.yaml"  # the resolved config, so a checkpoint can be used as an adapter
RUN_ENTRIES = (RUN_CONFIG, "metrics.jsonl", "checkpoints", "loss.png", "tensorboard", "router_biases.safetensors")


@dataclass(frozen=True)
class RunPlan:
    """What starting the run will do to its folder (decided before anything is written)."""

    path: Path
    mode: str  # "new" | "resume" | "overwrite"
    marker: Marker | None
    legacy: bool
    adapter_entries: tuple[str, ...]  # adapter folders that live directly in the run folder
    config_yaml: str = ""  # the resolved config, written to RUN_CONFIG

    @property
    def holds_run(self) -> bool:
        """The folder holds a run already (the one ``--resume`` continues)."""
        return self.legacy or (self.marker is not None and bool(self.marker.files))

    @property
    def run_id(self) -> str | None:
        """The id of the run being continued; None for a new run (its id is made on opening) or one
        from before run ids (every checkpoint in it is then taken as this run's when resuming)."""
        if self.mode != "resume" or self.marker is None:
            return None
        return self.marker.run_id


def is_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_optional_dependencies(config: TrainConfig) -> None:
    """Every optional package the config needs is importable, checked before anything is written."""
    if config.logging.tensorboard and not is_installed("tensorboard"):
        raise ConfigError(
            "logging.tensorboard: true needs the tensorboard package (pip install tensorboard), "
            "which is not installed; install it or set logging.tensorboard: false"
        )


def _holds_legacy_run(out: Path) -> bool:
    return any((p / "meta.json").is_file() for p in list_checkpoints(out / "checkpoints"))


def _describe(out: Path) -> str:
    found = list_checkpoints(out / "checkpoints")
    return f" (last checkpoint '{found[-1].name}')" if found else ""


def plan_run_folder(config: TrainConfig, *, resume, overwrite: bool = False) -> RunPlan:
    """Decide, reading only, whether the run may use its output folder; one clear error if not."""
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in checkpoint.output_dir and --overwrite starts it over: give one"
        )
    check_optional_dependencies(config)
    out = Path(config.checkpoint.output_dir)
    marker = check_output(out, "run", overwrite=True, key=KEY)  # kind mismatch and special folders
    legacy = marker is None and out.is_dir() and _holds_legacy_run(out)
    holds_run = legacy or (marker is not None and bool(marker.files))
    foreign = out.is_dir() and any(p.name != MARKER for p in out.iterdir()) and marker is None
    if resume is True and not holds_run:
        raise CheckpointError(
            f"--resume: '{out}' holds no moetune run to continue (no checkpoints); start it without --resume"
        )
    if not resume and holds_run and not overwrite:
        raise OutputError(
            f"{KEY}: '{out}' holds a moetune run{_describe(out)}; continue it with --resume, or start "
            "over with --overwrite (deletes only that run's own files)"
        )
    if not resume and legacy:
        raise OutputError(
            f"{KEY}: '{out}' holds a run from an earlier moetune that recorded no list of its files, so "
            "--overwrite cannot tell them from yours; continue it with --resume, or move it away"
        )
    if not resume and foreign and not overwrite:
        raise OutputError(
            f"{KEY}: '{out}' is not empty and moetune did not write it; give a new or empty folder, or "
            "pass --overwrite to write the run beside those files (none of them is changed or deleted)"
        )
    entries = _adapter_entries(config, out)
    mode = "resume" if resume else ("overwrite" if overwrite and out.is_dir() else "new")
    if not legacy:
        refuse_collisions(out, RUN_ENTRIES + entries, marker, KEY)
    _check_adapter_folders(config, overwrite=overwrite, skip_inside=out if legacy or mode == "overwrite" else None)
    return RunPlan(
        path=out, mode=mode, marker=marker, legacy=legacy, adapter_entries=entries, config_yaml=dump_config(config)
    )


def _adapter_entries(config: TrainConfig, out: Path) -> tuple[str, ...]:
    dirs = [config.adapter_dir(i) for i in range(len(config.adapters))]
    return tuple(d.name for d in dirs if d.resolve().parent == out.resolve())


def _check_adapter_folders(config: TrainConfig, *, overwrite: bool, skip_inside: Path | None) -> None:
    """Adapter folders are written at the end of training: refuse a bad one now, not after hours."""
    for i, adapter in enumerate(config.adapters):
        target = config.adapter_dir(i)
        if skip_inside is not None and target.resolve().parent == skip_inside.resolve():
            continue
        check_output(
            target, "adapter", overwrite=overwrite, key=f"adapters[{i}].output_dir" if adapter.output_dir else KEY
        )


def open_run_folder(plan: RunPlan) -> OwnedFolder:
    """Claim the folder as the plan says (main process only); returns it with the run's id."""
    adopt = RUN_ENTRIES + plan.adapter_entries if plan.legacy else ()
    folder = open_folder(plan.path, "run", overwrite=True, key=KEY, adopt=adopt)
    if plan.mode == "overwrite":
        folder.remove_recorded()
    if plan.legacy:
        for name in plan.adapter_entries:
            _adopt_adapter_folder(plan.path / name)
    folder.run_id = plan.run_id or new_run_id()
    write_marker(folder.path, Marker(kind="run", files=tuple(folder.files), run_id=folder.run_id))
    if plan.mode != "resume" or not (folder.path / RUN_CONFIG).is_file():
        # A resumed run keeps the config it started with: a resume that then fails (a broken
        # checkpoint) must leave the folder as it was. Its adapter sections, which reading a checkpoint
        # as an adapter needs, are the same (refused otherwise by resume.check_resume).
        write_text_atomic(folder.entry(RUN_CONFIG), plan.config_yaml)
    return folder


def _adopt_adapter_folder(path: Path) -> None:
    """An adapter folder an earlier moetune wrote without a marker becomes moetune's (to be replaced)."""
    if path.is_dir() and read_marker(path) is None:
        write_marker(path, Marker(kind="adapter", files=tuple(sorted(p.name for p in path.iterdir()))))


def adapter_target(folder: OwnedFolder, path: Path) -> Path:
    """An adapter folder inside the run folder is recorded as the run's before it is written."""
    return folder.entry(path.name) if path.resolve().parent == folder.path.resolve() else path


def run_view(plan: RunPlan) -> OwnedFolder:
    """The folder as ranks other than 0 see it: the run id for resuming, no writes."""
    return OwnedFolder(path=plan.path, kind="run", key=KEY, run_id=plan.run_id, writable=False)


def resolve_resume(config: TrainConfig, resume, run_id: str | None) -> Path | None:
    """``True``: this run's latest checkpoint; a path: that checkpoint. A finished run is refused."""
    if not resume:
        return None
    if resume is True:
        found = latest_checkpoint(Path(config.checkpoint.output_dir) / "checkpoints", run_id=run_id)
        if found is None:
            raise CheckpointError(
                f"--resume: no checkpoint under {config.checkpoint.output_dir}/checkpoints to resume from"
            )
    else:
        found = Path(resume)
        if not found.is_dir():
            raise CheckpointError(f"--resume: '{found}' is not a checkpoint folder")
    _refuse_finished(config, found)
    return found


def _refuse_finished(config: TrainConfig, checkpoint: Path) -> None:
    try:
        step = json.loads((checkpoint / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable checkpoint is reported, with what to do, when it is loaded
    last = max(config.adapter_optim(i).max_steps for i in range(len(config.adapters)))
    if step >= last:
        raise CheckpointError(
            f"--resume: the run in '{config.checkpoint.output_dir}' is finished ('{checkpoint.name}' is "
            f"at step {step}, optim.max_steps is {last}); to train on, raise it "
            f"(optim.max_steps={last * 2} --resume), or start over with --overwrite"
        )
