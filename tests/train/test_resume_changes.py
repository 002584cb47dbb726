"""``--resume`` with a changed config: optim settings are followed from the next step (with a warning
naming them), adapter settings are refused, and a checkpoint never mixes into another run's folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from moetune.config import load_train_config
from moetune.errors import CheckpointError
from moetune.train.checkpoint import latest_checkpoint
from moetune.train.trainer import train
from train_helpers import write_run

OLD = {"lr": 1e-2, "max_steps": 4, "batch_size": 8, "warmup_steps": 1}


def _lrs(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if "loss" in r]


def _run(root: Path, schedule: str) -> Path:
    return write_run(
        root,
        optim={**OLD, "lr_schedule": schedule},
        logging={"progress": False, "eval_every": 0},
    )


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_resume_follows_changed_optim_settings_from_the_next_step(tmp_path, caplog, schedule):
    """Before: step 5 ran at the end of the old cosine (0.0) and steps 6-8 at the old lr on the new
    schedule; a constant schedule kept lr 1e-2. Now steps 5-8 are those of a run made with the new settings."""
    new = ["optim.max_steps=8", "optim.lr=1e-4", "optim.weight_decay=0.1", "optim.loraplus_lr_ratio=4"]
    fresh = _run(tmp_path / "fresh", schedule)
    train(load_train_config(fresh, new))
    cfg = _run(tmp_path / "resumed", schedule)
    train(load_train_config(cfg))
    before = _lrs(tmp_path / "resumed" / "run")
    with caplog.at_level(logging.WARNING, logger="moetune.train.state"):
        train(load_train_config(cfg, new), resume=True)
    resumed, straight = _lrs(tmp_path / "resumed" / "run"), _lrs(tmp_path / "fresh" / "run")
    assert resumed[4:] == straight[4:], (resumed, straight)
    assert resumed[:4] == before and len(resumed) == 8
    warned = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    for change in ("optim.lr 0.01 -> 0.0001", "optim.max_steps 4 -> 8", "optim.weight_decay 0.0 -> 0.1"):
        assert change in warned[0], warned[0]
    state = torch.load(latest_checkpoint(tmp_path / "resumed" / "run" / "checkpoints") / "trainer_state.pt")
    groups = state["optimizers"]["default"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(1e-4, 0.1), (4e-4, 0.1)]
    assert state["schedulers"]["default"]["base_lrs"] == [1e-4, 4e-4]


def test_resume_names_only_the_changed_settings(tmp_path, caplog):
    cfg = _run(tmp_path, "cosine")
    train(load_train_config(cfg, ["optim.max_steps=2"]))
    with caplog.at_level(logging.INFO, logger="moetune.train.state"):
        train(load_train_config(cfg), resume=True)  # max_steps 2 -> 4: only that is named
    lines = [r.getMessage() for r in caplog.records if "settings" in r.getMessage()]
    assert len(lines) == 1 and "optim.max_steps 2 -> 4" in lines[0] and "optim.lr" not in lines[0], lines


def test_fewer_adapted_modules_without_a_run_config_is_a_checkpoint_error(tmp_path):
    """A run folder without moetune_run.yaml (an earlier moetune): the tensors themselves are checked.
    Before: torch's raw ValueError about the optimizer's parameter groups."""
    cfg = _run(tmp_path, "cosine")
    train(load_train_config(cfg, ["optim.max_steps=2"]))
    (tmp_path / "run" / "moetune_run.yaml").unlink()
    with pytest.raises(CheckpointError, match="which the config does not make"):
        train(load_train_config(cfg, ["adapter.target_modules=[q_proj]"]), resume=True)
