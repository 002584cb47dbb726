"""Nothing a user wrote is lost: every writing command refuses folders it does not own, and a run
folder is only continued (--resume) or started over (--overwrite) when the user says so."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.errors import ConfigError
from moetune.outputs import MARKER, OutputError, write_folder
from moetune.train.checkpoint import TrainState, list_checkpoints, save_checkpoint
from moetune.train import run_folder

from train_helpers import write_run


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _user_folder(path: Path) -> dict[str, str]:
    """A folder holding someone's files (named like the files moetune writes, to catch replacing)."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "todo.txt").write_text("my notes\n")
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "adapter_config.json").write_text('{"mine": true}\n')
    return _snapshot(path)


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moetune", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def _assert_one_line_refusal(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-800:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (adapter, checkpoints, metrics) to point commands at."""
    root = tmp_path_factory.mktemp("finished")
    cfg = write_run(
        root,
        optim={"lr": 3e-3, "max_steps": 2, "batch_size": 8},
        checkpoint={"output_dir": str(root / "run"), "save_every": 1, "keep_last": 3},
        data={"train": str(root / "train.jsonl"), "max_length": 48, "tokenizer": "byte"},
    )
    assert main(["train", str(cfg)]) == 0
    return root, cfg


def test_every_writing_command_leaves_a_user_folder_byte_for_byte(finished, tmp_path):
    root, cfg = finished
    model, adapter = root / "base", root / "run" / "adapter"
    commands = {
        "merge": ["merge", "--model", str(model), "--adapter", str(adapter)],
        "export": ["export", "--model", str(model), "--adapter", str(adapter)],
        "merge-adapters": [
            "merge-adapters",
            "--model",
            str(model),
            "--adapter",
            str(adapter),
            "--adapter",
            str(adapter),
        ],
        "demo": ["demo", "--quick"],
    }
    for name, args in commands.items():
        target = tmp_path / name
        before = _user_folder(target)
        _assert_one_line_refusal(_run_cli(*args, "--out", str(target)), str(target))
        assert _snapshot(target) == before, name
    target = tmp_path / "train"
    before = _user_folder(target)
    _assert_one_line_refusal(_run_cli("train", str(cfg), f"checkpoint.output_dir={target}"), str(target))
    assert _snapshot(target) == before


def test_merge_over_a_finished_run_folder_is_refused_and_keeps_it(finished):
    root, _ = finished
    before = _snapshot(root / "run")
    for cmd in ("merge", "export"):
        proc = _run_cli(
            cmd, "--model", str(root / "base"), "--adapter", str(root / "run" / "adapter"), "--out", str(root / "run")
        )
        _assert_one_line_refusal(proc, "run")
    assert _snapshot(root / "run") == before


def test_out_naming_a_file_or_the_current_folder_is_a_clear_error(finished, tmp_path):
    root, _ = finished
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"precious")
    base = ["merge", "--model", str(root / "base"), "--adapter", str(root / "run" / "adapter")]
    _assert_one_line_refusal(_run_cli(*base, "--out", str(file)), "is a file")
    assert file.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]
    _assert_one_line_refusal(_run_cli(*base, "--out", ".", cwd=tmp_path), "current folder")
    _assert_one_line_refusal(_run_cli(*base, "--out", str(root / "base")), "input")


def test_overwrite_writes_beside_user_files_and_replaces_only_its_own(finished, tmp_path):
    root, _ = finished
    target = tmp_path / "out"
    (target / "notes").mkdir(parents=True)
    (target / "notes" / "todo.txt").write_text("mine\n")
    before = _snapshot(target)
    args = ["export", "--model", str(root / "base"), "--adapter", str(root / "run" / "adapter"), "--out", str(target)]
    assert main([*args, "--overwrite"]) == 0
    assert (target / "adapter_model.safetensors").is_file() and _snapshot(target)["notes/todo.txt"] == before[
        "notes/todo.txt"
    ]
    assert main(args) == 0  # its own earlier export of the same kind: replaced, the user's file kept
    assert (target / "notes" / "todo.txt").read_text() == "mine\n"
    assert set(json.loads((target / MARKER).read_text())["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "moetune_adapter.json",
    }
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "adapter_config.json").write_text("{}")
    with pytest.raises(OutputError, match="adapter_config.json"):
        write_folder(clash, "adapter", lambda tmp: (tmp / "adapter_config.json").write_text("{}"), overwrite=True)
    assert (clash / "adapter_config.json").read_text() == "{}" and sorted(p.name for p in clash.iterdir()) == [
        "adapter_config.json"
    ]


def test_a_kill_while_writing_leaves_the_earlier_output(tmp_path):
    out = tmp_path / "adapter"
    write_folder(out, "adapter", lambda tmp: (tmp / "a.txt").write_text("first"))

    def dies(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(out, "adapter", dies)
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind


def test_train_into_an_existing_run_is_refused_without_resume_or_overwrite(finished, tmp_path):
    root, cfg = finished
    before = _snapshot(root / "run")
    _assert_one_line_refusal(_run_cli("train", str(cfg)), "--resume")
    assert _snapshot(root / "run") == before
    _assert_one_line_refusal(_run_cli("train", str(cfg), "--resume"), "finished")  # max_steps reached: say so
    assert _snapshot(root / "run") == before


def test_overwrite_starts_the_run_over_and_keeps_user_files(tmp_path):
    cfg = write_run(
        tmp_path,
        optim={"lr": 3e-3, "max_steps": 3, "batch_size": 8},
        checkpoint={"output_dir": str(tmp_path / "run"), "save_every": 1, "keep_last": 5},
    )
    assert main(["train", str(cfg)]) == 0
    (tmp_path / "run" / "my_notes.md").write_text("keep me\n")
    assert main(["train", str(cfg), "optim.max_steps=2", "--overwrite"]) == 0
    run = tmp_path / "run"
    assert (run / "my_notes.md").read_text() == "keep me\n"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-00000001", "checkpoint-00000002"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # the old run's lines are gone, not mixed in


def test_pruning_touches_only_checkpoints_of_the_current_run(tmp_path):
    root = tmp_path / "checkpoints"
    state = lambda step: TrainState(
        step=step, adapters={"a": {}}, optimizers={}, schedulers={}, data={}, rng={}, extra={}
    )
    for step in (10, 11, 12):  # an earlier run's, numbered after the new run's
        save_checkpoint(root, state(step), keep_last=5, run_id="old")
    for step in (1, 2, 3):
        save_checkpoint(root, state(step), keep_last=2, run_id="new")
    assert [p.name[-2:] for p in list_checkpoints(root)] == ["02", "03", "10", "11", "12"]


def test_resume_finds_this_runs_checkpoint_not_a_later_numbered_stranger(tmp_path):
    cfg = write_run(tmp_path, optim={"lr": 3e-3, "max_steps": 4, "batch_size": 8})
    from moetune.config import load_train_config

    config = load_train_config(cfg)
    assert main(["train", str(cfg), "optim.max_steps=2"]) == 0
    stranger = TrainState(step=9, adapters={"x": {}}, optimizers={}, schedulers={}, data={}, rng={}, extra={})
    save_checkpoint(tmp_path / "run" / "checkpoints", stranger, run_id="someone-else")
    plan = run_folder.plan_run_folder(config, resume=True)
    assert run_folder.resolve_resume(config, True, plan.run_id).name == "checkpoint-00000002"


def test_missing_tensorboard_is_refused_before_anything_is_written(finished, monkeypatch):
    root, cfg = finished
    from moetune.config import load_train_config

    config = load_train_config(cfg, ["logging.tensorboard=true"])
    monkeypatch.setattr(run_folder, "is_installed", lambda _name: False)
    before = _snapshot(root / "run")
    with pytest.raises(ConfigError, match="tensorboard"):
        run_folder.plan_run_folder(config, resume=True)
    assert _snapshot(root / "run") == before


def test_a_run_folder_from_before_markers_is_refused_and_resumable(tmp_path):
    cfg = write_run(tmp_path, optim={"lr": 3e-3, "max_steps": 4, "batch_size": 8})
    assert main(["train", str(cfg), "optim.max_steps=2"]) == 0
    (tmp_path / "run" / MARKER).unlink()
    (tmp_path / "run" / "adapter" / MARKER).unlink()
    before = _snapshot(tmp_path / "run")
    for flags in ([], ["--overwrite"]):
        _assert_one_line_refusal(_run_cli("train", str(cfg), *flags), "run")
        assert _snapshot(tmp_path / "run") == before
    assert main(["train", str(cfg), "--resume"]) == 0  # adopted: continues to step 4, replaces its adapter
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
