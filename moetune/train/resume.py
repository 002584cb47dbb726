"""What ``--resume`` may not change, checked (reading only) before the model is loaded.

A checkpoint continues the run that wrote it, in that run's folder, or starts a new run in a new or
empty folder. Resumed into the folder of another run it would mix two runs' metrics, checkpoints and
adapter folder, so that is refused.

The adapters stay those of the run (``moetune_run.yaml`` in the checkpoint's run folder, which
reading a checkpoint as an adapter relies on): trained on with another alpha, dropout or targets, an
adapter would no longer be what the run's files say, so a changed adapter key is refused, named with
its old and new value. An adapter's ``data``, ``optim`` and ``output_dir`` may change; the optim
settings a checkpoint's state holds then follow the config (see :mod:`.state`), and changed training
data is said in a warning (the data position is kept); the tokenizer may not change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from ..config import Key, TrainConfig, dotted, from_dict, to_plain
from ..config.schema import show_value
from ..errors import CheckpointError, ConfigError, MoetuneError
from .checkpoint import checkpoint_run_id
from .run_folder import RUN_CONFIG, RunPlan

log = logging.getLogger(__name__)
FREE_KEYS = ("data", "optim", "output_dir")  # an adapter's keys that may change across a resume
SHOWN = 6  # changed keys named in the message


def check_resume(config: TrainConfig, plan: RunPlan, checkpoint: Path) -> None:
    """Refuse resuming ``checkpoint`` as ``config`` and ``plan`` say, when that would mix two runs or
    change an adapter; one line naming what differs and what to do."""
    _check_same_run(plan, checkpoint)
    _check_same_adapters(config, checkpoint)


def _check_same_run(plan: RunPlan, checkpoint: Path) -> None:
    if not plan.holds_run:
        return  # a new or empty folder: a new run starts from the checkpoint
    owner, ours = checkpoint_run_id(checkpoint), plan.marker.run_id if plan.marker else None
    if owner is not None and ours is not None:
        same = owner == ours
    else:  # a run from before run ids: its checkpoints are those in its folder
        same = checkpoint.resolve().parent == (plan.path / "checkpoints").resolve()
    if same:
        return
    home = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    raise CheckpointError(
        f"--resume: '{checkpoint}' belongs to another run (run {owner or 'without an id'}, in '{home}') than "
        f"the one in '{plan.path}' (run {ours or 'without an id'}); resuming it there would mix the two runs' "
        f"metrics, checkpoints and adapter: resume it in its own run folder (checkpoint.output_dir={home}), "
        "or in a new or empty checkpoint.output_dir to start a new run from it"
    )


def _check_same_adapters(config: TrainConfig, checkpoint: Path) -> None:
    source = checkpoint.parent.parent / RUN_CONFIG
    if not source.is_file():
        return  # a run from before moetune_run.yaml: only the tensors are checked, when loaded (.state)
    try:
        run = from_dict(TrainConfig, yaml.safe_load(source.read_text()), where=str(source))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, MoetuneError) as exc:
        log.warning("cannot compare the adapter settings with the run's (%s); they are the config's", exc)
        return
    _check_data(run, config, source)
    was, now = [a.name for a in run.adapters], [a.name for a in config.adapters]
    if was != now:
        raise ConfigError(
            f"--resume: the run in '{source.parent}' trains adapters {was}, the config {now}; a run's adapters "
            "cannot change: resume with the run's adapters, or start a new run without --resume"
        )
    before, after = _settings(run), _settings(config)
    changed = [k for k in {**before, **after} if before.get(k, "unset") != after.get(k, "unset")]
    if changed:
        shown = [f"{k} {_show(before, k)} -> {_show(after, k)}" for k in changed[:SHOWN]]
        more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        raise ConfigError(
            f"--resume: adapter settings differ from the run's ({source}): {', '.join(shown)}{more}; an adapter "
            "cannot change within a run (its checkpoints and adapter folder are read with the run's settings): "
            "resume with the run's values, or train with the new ones as a new run, without --resume (--overwrite, "
            "or another checkpoint.output_dir)"
        )


def _check_data(run: TrainConfig, config: TrainConfig, source: Path) -> None:
    """The tokenizer may not change (an adapter is trained on its ids, and ``eval`` reads the run's);
    other training-data keys may, said in a warning: the checkpoint's data position (how far into
    which epoch) is kept, and in other data it points at other rows than the run would have read."""
    before, after = _data_settings(run), _data_settings(config)
    changed = [k for k in {**before, **after} if before.get(k, "unset") != after.get(k, "unset")]
    shown = ", ".join(f"{k} {_show(before, k)} -> {_show(after, k)}" for k in changed[:SHOWN])
    if any(k.endswith(".tokenizer") for k in changed):
        raise ConfigError(
            f"--resume: the tokenizer differs from the run's ({source}): {shown}; an adapter is trained on its "
            "tokenizer's ids: resume with the run's tokenizer, or train with the new one as a new run, without --resume"
        )
    if changed:
        log.warning(
            "--resume: the training data differs from the run's (%s): %s; the checkpoint's data position is kept "
            "and now counts in the new data, so the rows that follow are not those the run would have read",
            source,
            shown,
        )


def _data_settings(config: TrainConfig) -> dict[str, Any]:
    """The keys that decide which rows train, and in which order (the eval file does not)."""
    out: dict[str, Any] = {"seed": config.seed}
    for i in range(len(config.adapters)):
        plain = {k: v for k, v in to_plain(config.adapter_data(i)).items() if k != "eval"}
        for key in ("train", "tokenizer"):  # the same file, however its path was written
            if plain[key] not in (None, "byte"):
                plain[key] = os.path.realpath(plain[key])
        _flatten(plain, ("data",) if len(config.adapters) == 1 else ("adapters", i, "data"), out)
    return out


def _settings(config: TrainConfig) -> dict[str, Any]:
    """Every adapter's keys that must stay, by the name a user writes them (``adapter.alpha``)."""
    out: dict[str, Any] = {}
    for i, adapter in enumerate(config.adapters):
        plain = {k: v for k, v in to_plain(adapter).items() if k not in FREE_KEYS}
        if plain["path"] is not None:  # the same folder, however it was written
            plain["path"] = os.path.realpath(plain["path"])
        _flatten(plain, ("adapter",) if len(config.adapters) == 1 else ("adapters", i), out)
    return out


def _flatten(value: Any, key: Key, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for name, item in value.items():
            _flatten(item, (*key, name), out)
    else:
        out[dotted(key)] = value


def _show(settings: dict[str, Any], key: str) -> str:
    return show_value(settings[key]) if key in settings else "unset"
