"""Trainer: exact resume after a real kill, crash-safe checkpoints, user-error messages."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from moetune.config import load_train_config
from moetune.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from moetune.train.trainer import train
from train_helpers import losses, train_killed_after, write_run

KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import moetune.train.checkpoint as ckpt
    real, calls = ckpt.save_file, []
    def write_half_then_die(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: leave a partial file, then die
            with open(path, "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, path, **kw)
    ckpt.save_file = write_half_then_die
    from moetune.cli import main
    sys.exit(main(["train", sys.argv[1]]))
    """
)


def _run_script(script: str, cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, str(cfg)], capture_output=True, text=True, timeout=300)


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    straight = write_run(tmp_path / "a")
    train(load_train_config(straight))
    killed_cfg = write_run(tmp_path / "b")
    proc = train_killed_after(killed_cfg, 4)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "b" / "run" / "checkpoints").name == "checkpoint-00000004"
    train(load_train_config(killed_cfg), resume=True)
    a, b = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert len(a) == 8 and a == b
    wa, wb = _adapter(tmp_path / "a" / "run"), _adapter(tmp_path / "b" / "run")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_while_writing_checkpoint_keeps_previous(tmp_path):
    cfg = write_run(tmp_path)
    proc = _run_script(KILL_DURING_SAVE, cfg)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000001"]
    state = load_checkpoint(latest_checkpoint(root))
    assert state.step == 1
    result = train(load_train_config(cfg), resume=True)
    assert result.steps == 8


def test_training_lowers_loss_and_writes_outputs(tmp_path):
    cfg = write_run(tmp_path, optim={"lr": 5e-3, "max_steps": 30, "batch_size": 8, "warmup_steps": 3})
    result = train(load_train_config(cfg))
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3, ls
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "run" / name).exists(), name
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert result.eval_loss is not None and result.skipped_steps == 0


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "moetune", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _assert_user_error(proc, needle):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_ten_malformed_inputs_give_one_line_errors(tmp_path):
    good = write_run(tmp_path)
    cases = []
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {path: x\noptim: [")
    cases.append(([bad_yaml], "line"))
    cases.append(([good, "optim.lr_shedule=1"], "did you mean 'lr_schedule'"))
    cases.append(([good, "optim.max_steps=many"], "optim.max_steps"))
    cases.append(([good, f"data.train={tmp_path / 'nope.jsonl'}"], "nope.jsonl"))
    (tmp_path / "nonjson.jsonl").write_text('{"text": "ok"}\n{not json\n')
    cases.append(([good, f"data.train={tmp_path / 'nonjson.jsonl'}"], "line 2"))
    (tmp_path / "nofield.jsonl").write_text('{"instruction": "a"}\n')
    cases.append(([good, f"data.train={tmp_path / 'nofield.jsonl'}", "data.format=instruction"], "output"))
    (tmp_path / "empty.jsonl").write_text("")
    cases.append(([good, f"data.train={tmp_path / 'empty.jsonl'}"], "empty.jsonl"))
    cases.append(([good, "adapter.r=0"], "r"))
    cases.append(([good, f"model.path={tmp_path / 'no-model'}"], "no-model"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases.append(([good, f"checkpoint.output_dir={blocker / 'out'}"], "output_dir"))
    for args, needle in cases:
        _assert_user_error(_cli("train", *args), needle)
