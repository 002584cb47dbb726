"""``moetune train --resume`` refuses, in one line and before writing anything, what would silently
give a wrong run: changed adapter settings, and a checkpoint of another run resumed into a run folder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moetune.cli import main
from train_helpers import write_run


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _refused(*args: str) -> str:
    """The one error line of a refused ``moetune train``."""
    proc = subprocess.run(
        [sys.executable, "-m", "moetune", "train", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Runs 'a' and 'b' of one config, 2 steps each, in their own folders."""
    root = tmp_path_factory.mktemp("resume")
    cfg = write_run(root, optim={"lr": 3e-3, "max_steps": 2, "batch_size": 8}, logging={"progress": False})
    for name in ("a", "b"):
        assert main(["train", str(cfg), f"checkpoint.output_dir={root / name}"]) == 0
    return root, cfg


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (["adapter.alpha=64", "adapter.dropout=0.5"], ["adapter.alpha 8.0 -> 64.0", "adapter.dropout 0.1 -> 0.5"]),
        # fewer adapted modules: before, torch's ValueError about the optimizer's parameter groups
        (["adapter.target_modules=[q_proj]"], ["adapter.target_modules ['q_proj', 'v_proj', 'experts'] -> ['q_proj']"]),
    ],
)
def test_changed_adapter_settings_are_refused_naming_old_and_new(two_runs, changes, named):
    root, cfg = two_runs
    before = _snapshot(root / "a")
    line = _refused(str(cfg), f"checkpoint.output_dir={root / 'a'}", "optim.max_steps=4", *changes, "--resume")
    assert "adapter settings differ from the run's" in line, line
    for text in named:
        assert text in line, line
    assert _snapshot(root / "a") == before


def test_another_runs_checkpoint_is_refused_into_a_run_folder_and_starts_a_new_run_elsewhere(two_runs):
    root, cfg = two_runs
    checkpoint = root / "a" / "checkpoints" / "checkpoint-00000002"
    before = _snapshot(root / "b")
    line = _refused(str(cfg), f"checkpoint.output_dir={root / 'b'}", "optim.max_steps=4", "--resume", str(checkpoint))
    assert "belongs to another run" in line and str(root / "a") in line and "new or empty" in line, line
    assert _snapshot(root / "b") == before
    # into a new folder: a new run that starts from a's step 2 (as before)
    assert (
        main(
            ["train", str(cfg), f"checkpoint.output_dir={root / 'c'}", "optim.max_steps=4", "--resume", str(checkpoint)]
        )
        == 0
    )
    assert _steps(root / "c")[:2] == [3, 4]


def test_a_changed_tokenizer_is_refused_and_changed_data_is_said(two_runs, caplog):
    import logging

    root, cfg = two_runs
    before = _snapshot(root / "b")
    out = f"checkpoint.output_dir={root / 'b'}"
    line = _refused(str(cfg), out, "optim.max_steps=4", "data.tokenizer=null", "--resume")
    assert "the tokenizer differs from the run's" in line and "data.tokenizer 'byte' -> null" in line, line
    assert _snapshot(root / "b") == before
    with caplog.at_level(logging.WARNING, logger="moetune"):
        args = [f"checkpoint.output_dir={root / 'b'}", "optim.max_steps=3", "data.max_length=40", "--resume"]
        assert main(["train", str(cfg), *args]) == 0
    warned = [r.getMessage() for r in caplog.records if "training data differs" in r.getMessage()]
    assert len(warned) == 1 and "data.max_length 48 -> 40" in warned[0], warned
    assert _steps(root / "b")[-1] == 3


def test_an_override_right_after_resume_is_an_override_not_a_checkpoint_path(two_runs):
    root, cfg = two_runs
    assert main(["train", str(cfg), f"checkpoint.output_dir={root / 'a'}", "--resume", "optim.max_steps=3"]) == 0
    assert _steps(root / "a")[-1] == 3
