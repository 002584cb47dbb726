"""A truncated, corrupted or empty .safetensors file in a model, adapter or training-checkpoint folder
gives one error naming the file and what is wrong (one line, exit 2 from the CLI), `moetune inspect`
finds it, a corrupt checkpoint points at the previous one, and nothing already written changes."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import moetune
from moetune.cli import main
from moetune.tiny_models import tiny_moe_args
from moetune.errors import AdapterError, CheckpointError
from moetune.inspect import inspect_model
from moetune.model import build_random_model
from moetune.safetensors_check import check_safetensors, safetensors_problem
from moetune.train.checkpoint import list_checkpoints, load_checkpoint
from train_helpers import write_run

SHARD = "model-00002-of-00003.safetensors"


def truncate(f: Path) -> str:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    return "is truncated: header says"


def empty(f: Path) -> str:
    f.write_bytes(b"")
    return "is empty"


def garble(f: Path) -> str:
    """Keep the length field, overwrite the JSON header (a disk or transfer error)."""
    data = bytearray(f.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = b"\xff" * length
    f.write_bytes(bytes(data))
    return "not a safetensors file (header unreadable"


DAMAGE = [truncate, empty, garble]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(capsys, *args) -> str:
    """Run the CLI in-process; assert a user error: exit 2, one line on stderr, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def cli_process(*args) -> str:
    """:func:`cli` in a fresh process, so that log lines and a traceback would show on stderr too."""
    proc = subprocess.run(
        [sys.executable, "-m", "moetune", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A sharded tiny model (3 shards), a LoRA adapter for it, and a finished 3-step run with checkpoints."""
    root = tmp_path_factory.mktemp("corrupt")
    model_dir = root / "base"
    model = build_random_model(tiny_moe_args(272), seed=0, std=0.05)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(model_dir, max_shard_size=int(total / 2.1))
    assert (model_dir / SHARD).is_file(), sorted(p.name for p in model_dir.iterdir())
    moetune.add_adapter(model, moetune.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "experts"]))
    adapter_dir = moetune.save_adapter(model, root / "adapter")
    run_root = root / "trainroot"
    cfg = write_run(
        run_root,
        data={
            "train": str(run_root / "train.jsonl"),
            "eval": str(run_root / "val.jsonl"),
            "max_length": 48,
            "tokenizer": "byte",
        },
        optim={"lr": 1e-3, "max_steps": 3, "batch_size": 4, "warmup_steps": 1},
        checkpoint={"output_dir": str(run_root / "run"), "save_every": 1, "keep_last": 3},
        logging={"progress": False, "eval_every": 100},
    )
    assert main(["train", str(cfg)]) == 0
    return {"model": model_dir, "adapter": adapter_dir, "run_cfg": cfg, "run": run_root / "run"}


@pytest.fixture
def model_dir(files, tmp_path):
    return Path(shutil.copytree(files["model"], tmp_path / "base"))


@pytest.fixture
def adapter_dir(files, tmp_path):
    return Path(shutil.copytree(files["adapter"], tmp_path / "adapter"))


@pytest.fixture
def run(files, tmp_path):
    """A copy of the finished run and a config that points at it."""
    run_dir = Path(shutil.copytree(files["run"], tmp_path / "run"))
    cfg = yaml.safe_load(files["run_cfg"].read_text())
    cfg["checkpoint"]["output_dir"] = str(run_dir)
    cfg["optim"]["max_steps"] = 5  # resuming continues past the last checkpoint
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_dir, path


# --- the shared check -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_check_names_file_and_problem(files, tmp_path, damage):
    f = Path(shutil.copy(files["model"] / SHARD, tmp_path / SHARD))
    assert safetensors_problem(f) is None
    needle = damage(f)
    with pytest.raises(CheckpointError) as err:
        check_safetensors(f)
    assert str(f) in str(err.value) and needle in str(err.value)


def test_check_reports_sizes_and_extra_bytes(files, tmp_path):
    f = Path(shutil.copy(files["model"] / SHARD, tmp_path / SHARD))
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-1000])
    (length,) = struct.unpack("<Q", f.read_bytes()[:8])
    data = size - 8 - length
    assert (
        safetensors_problem(f) == f"is truncated: header says {data:,} bytes of tensor data, file has {data - 1000:,}"
    )
    f.write_bytes(f.read_bytes()[: 8 + length // 2])
    assert "is truncated inside its header" in safetensors_problem(f)
    g = Path(shutil.copy(files["model"] / SHARD, tmp_path / "g.safetensors"))
    g.write_bytes(g.read_bytes() + b"\0\0")
    assert "extra bytes" in safetensors_problem(g)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    assert "not a safetensors file" in safetensors_problem(tmp_path / "short.safetensors")


# --- model folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_model_load_names_broken_shard(model_dir, damage):
    needle = damage(model_dir / SHARD)
    before = snapshot(model_dir)
    with pytest.raises(CheckpointError) as err:
        moetune.load_model(model_dir)
    assert str(model_dir / SHARD) in str(err.value) and needle in str(err.value)
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("damage", DAMAGE)
def test_cli_generate_with_broken_shard(model_dir, capsys, damage):
    needle = damage(model_dir / SHARD)
    args = ("generate", "--model", model_dir, "--tokenizer", "byte", "--prompt", "hi", "--max-new-tokens", 1)
    err = cli_process(*args) if damage is truncate else cli(capsys, *args)
    assert SHARD in err and needle in err


def test_cli_merge_with_broken_shard_writes_nothing(model_dir, adapter_dir, tmp_path, capsys):
    needle = truncate(model_dir / SHARD)
    err = cli(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", tmp_path / "merged")
    assert SHARD in err and needle in err
    assert not (tmp_path / "merged").exists()


# --- inspect --------------------------------------------------------------------------------------


def test_inspect_healthy_folder_says_checked(model_dir):
    assert "3 safetensors file(s)" in inspect_model(model_dir) and "(headers and sizes checked)" in inspect_model(
        model_dir
    )


def test_inspect_reports_every_broken_shard(model_dir, capsys):
    truncate(model_dir / SHARD)
    empty(model_dir / "model-00003-of-00003.safetensors")
    with pytest.raises(CheckpointError) as err:
        inspect_model(model_dir)
    msg = str(err.value)
    assert "2 of 3" in msg and SHARD in msg and "model-00003-of-00003.safetensors" in msg
    assert "is truncated" in msg and "is empty" in msg and "model-00001" not in msg
    err = cli_process("inspect", model_dir)
    assert SHARD in err and "is empty" in err


# --- adapter folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_adapter_load_names_broken_file(files, adapter_dir, damage):
    weights = adapter_dir / "adapter_model.safetensors"
    needle = damage(weights)
    before = snapshot(adapter_dir)
    model = moetune.load_model(files["model"])
    with pytest.raises(AdapterError) as err:
        moetune.load_adapter(model, adapter_dir)
    assert str(weights) in str(err.value) and needle in str(err.value)
    assert snapshot(adapter_dir) == before


def test_cli_with_broken_adapter(files, adapter_dir, tmp_path, capsys):
    needle = garble(adapter_dir / "adapter_model.safetensors")
    err = cli(
        capsys,
        "generate",
        "--model",
        files["model"],
        "--adapter",
        adapter_dir,
        "--tokenizer",
        "byte",
        "--prompt",
        "hi",
        "--max-new-tokens",
        1,
    )
    assert "adapter_model.safetensors" in err and needle in err
    err = cli(
        capsys,
        "merge-adapters",
        "--model",
        files["model"],
        "--adapter",
        adapter_dir,
        "--adapter",
        files["adapter"],
        "--out",
        tmp_path / "m",
    )
    assert str(adapter_dir / "adapter_model.safetensors") in err and needle in err
    assert not (tmp_path / "m").exists()


# --- training checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_from_broken_checkpoint_offers_previous(run, capsys, damage):
    run_dir, cfg = run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [c.name for c in ckpts] == ["checkpoint-00000001", "checkpoint-00000002", "checkpoint-00000003"]
    broken = ckpts[-1] / "adapter-default.safetensors"
    needle = damage(broken)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpts[-1])
    msg = str(err.value)
    assert str(broken) in msg and needle in msg
    assert f"the previous checkpoint is '{ckpts[-2]}'" in msg and "--resume" in msg
    before = snapshot(run_dir)
    err = cli_process("train", cfg, "--resume") if damage is truncate else cli(capsys, "train", cfg, "--resume")
    assert "adapter-default.safetensors" in err and needle in err and str(ckpts[-2]) in err
    assert snapshot(run_dir) == before


def test_broken_trainer_state_names_file_and_offers_previous(run, capsys):
    run_dir, cfg = run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    state = ckpts[-1] / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = snapshot(run_dir)
    err = cli(capsys, "train", cfg, "--resume")
    assert str(state) in err and str(ckpts[-2]) in err
    assert snapshot(run_dir) == before


def test_previous_checkpoint_offered_is_a_readable_one(run):
    run_dir, _ = run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    empty(ckpts[-1] / "adapter-default.safetensors")
    truncate(ckpts[-2] / "adapter-default.safetensors")
    with pytest.raises(CheckpointError, match=f"the previous checkpoint is '{ckpts[0]}'"):
        load_checkpoint(ckpts[-1])


def test_no_previous_checkpoint_says_so(run):
    run_dir, _ = run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    for c in ckpts[:-1]:
        shutil.rmtree(c)
    (ckpts[-1] / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpts[-1])
    assert str(ckpts[-1] / "meta.json") in str(err.value) and "no earlier checkpoint" in str(err.value)


def test_a_folder_without_adapter_config_says_what_it_holds(files, adapter_dir, run, tmp_path):
    model = moetune.load_model(files["model"])
    several = tmp_path / "several"  # PEFT's save of several adapters: one subfolder each
    for name in ("foo", "bar"):
        shutil.copytree(adapter_dir, several / name)
    with pytest.raises(AdapterError, match=r"holds adapter folders \(bar, foo\): give one of them"):
        moetune.load_adapter(model, several)
    run_dir, _ = run
    renamed = Path(shutil.copytree(list_checkpoints(run_dir / "checkpoints")[-1], tmp_path / "my-best-step"))
    with pytest.raises(AdapterError, match="looks like a training checkpoint"):
        moetune.load_adapter(model, renamed)
