"""Files a user puts inside moetune's own folders (a model card beside the adapter, notes among the
checkpoints) survive starting the run over and the pruning of old checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from moetune.cli import main
from moetune.markers import MARKER, Marker, read_marker, write_marker
from moetune.removal import remove_ours
from moetune.train.checkpoint import TrainState, save_checkpoint

from train_helpers import write_run


def _state(step: int) -> TrainState:
    return TrainState(step=step, adapters={"a": {}}, optimizers={}, schedulers={}, data={}, rng={}, extra={})


def test_overwrite_keeps_user_files_inside_the_adapter_and_checkpoint_folders(tmp_path, caplog):
    run = tmp_path / "run"
    cfg = write_run(
        tmp_path,
        optim={"lr": 3e-3, "max_steps": 3, "batch_size": 8},
        checkpoint={"output_dir": str(run), "save_every": 1, "keep_last": 5},
    )
    assert main(["train", str(cfg)]) == 0
    user = {
        run / "adapter" / "README.md": "my model card\n",
        run / "checkpoints" / "NOTES.txt": "notes\n",
        run / "checkpoints" / "checkpoint-00000003" / "mine.txt": "inside moetune's checkpoint\n",
    }
    (run / "checkpoints" / "checkpoint-00000099").mkdir()
    user[run / "checkpoints" / "checkpoint-00000099" / "my.bin"] = "a folder of my own\n"
    for path, text in user.items():
        path.write_text(text)
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(cfg), "optim.max_steps=2", "--overwrite"]) == 0
    assert {p: p.read_text() for p in user} == user
    assert "kept 4 file(s) moetune did not write" in caplog.text
    # the new run's own files are all there and recorded; the old run's are gone
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert set(read_marker(run / "adapter").files) == {p.name for p in (run / "adapter").iterdir()} - {
        MARKER,
        "README.md",
    }
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-00000003").iterdir()) == [MARKER, "mine.txt"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    # the emptied checkpoint-00000003 is no checkpoint to resume from; the user's own folder still is
    # looked at (it has a checkpoint's name), so it goes before resuming
    (run / "checkpoints" / "checkpoint-00000099" / "my.bin").rename(tmp_path / "my.bin")
    (run / "checkpoints" / "checkpoint-00000099").rmdir()
    assert main(["train", str(cfg), "optim.max_steps=3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and (run / "checkpoints" / "checkpoint-00000003" / "mine.txt").is_file()


def test_pruning_keeps_a_user_file_inside_an_old_checkpoint(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, _state(1), keep_last=1, run_id="r")
    (root / "checkpoint-00000001" / "eval_notes.txt").write_text("mine\n")
    with caplog.at_level(logging.WARNING):
        save_checkpoint(root, _state(2), keep_last=1, run_id="r")
    old = root / "checkpoint-00000001"
    assert sorted(p.name for p in old.iterdir()) == [MARKER, "eval_notes.txt"]
    assert "kept 1 file(s)" in caplog.text
    save_checkpoint(root, _state(3), keep_last=1, run_id="r")  # the emptied folder is not pruned again
    assert not (root / "checkpoint-00000002").exists() and (old / "eval_notes.txt").read_text() == "mine\n"


def test_remove_ours_takes_apart_marked_folders_and_containers_only(tmp_path):
    out = tmp_path / "out"
    (out / "box" / "ck").mkdir(parents=True)
    (out / "box" / "ck" / "w.bin").write_text("ours")
    write_marker(out / "box" / "ck", Marker(kind="checkpoint", files=("w.bin",)))
    (out / "box" / "events.out.tfevents.1.host").write_text("ours")
    (out / "box" / "user.txt").write_text("theirs")
    (out / "a.json").write_text("ours")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("theirs")
    (out / "link").symlink_to(elsewhere)
    (out / "stranger.txt").write_text("theirs")
    write_marker(out, Marker(kind="run", files=("a.json", "box", "link")))

    kept = remove_ours(out)

    assert sorted(kept) == [out / "box" / "user.txt", out / "stranger.txt"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "box", "stranger.txt"]
    assert sorted(p.name for p in (out / "box").iterdir()) == ["user.txt"]
    assert read_marker(out).files == ("box",)  # still moetune's folder, holding someone's file
    assert (elsewhere / "precious").read_text() == "theirs"  # a link is removed, never followed


def test_remove_ours_removes_a_folder_of_only_its_files(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    write_marker(out, Marker(kind="adapter", files=("adapter_config.json",)))
    assert remove_ours(out) == [] and not out.exists()
    assert remove_ours(Path(tmp_path / "absent")) == []


def test_remove_ours_removes_an_interrupted_checkpoint_write_whole(tmp_path):
    box = tmp_path / "checkpoints"
    (box / ".checkpoint-00000005.tmp-x1y2").mkdir(parents=True)
    (box / ".checkpoint-00000005.tmp-x1y2" / "trainer_state.pt").write_text("ours, half written")
    assert remove_ours(box) == [] and not box.exists()
