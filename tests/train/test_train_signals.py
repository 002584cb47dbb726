"""SIGTERM and SIGINT stop a run cleanly: the step in progress completes, a checkpoint of it is
written (``checkpoint.save_on_interrupt``, default on), one line on stderr, exit 143 / 130; and
``--resume`` from that checkpoint reproduces the uninterrupted run bitwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moetune.cli import main
from moetune.config import load_train_config
from moetune.signals import StopRequest, Terminated, sigterm_raises
from moetune.train.checkpoint import list_checkpoints
from moetune.train.trainer import train
from train_helpers import losses, write_run

# Every step sleeps first, so a signal sent from outside most likely lands inside a step.
SLOW_STEPS = textwrap.dedent(
    """
    import sys, time
    from moetune.train.loop import Trainer
    def slow(self, *args, real=Trainer.train_step):
        time.sleep(0.4)
        return real(self, *args)
    Trainer.train_step = slow
    from moetune.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
    """
)


def _config(root: Path, **extra) -> Path:
    cfg = write_run(root, checkpoint={"output_dir": str(root / "run"), "save_every": 0, **extra})
    return cfg


def _signal_after(
    cfg: Path, signum: int, *, lines: int = 2, args: tuple = ()
) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``moetune train cfg`` (slowed) in a subprocess; send ``signum`` once metrics.jsonl has ``lines`` records."""
    metrics = cfg.parent / "run" / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_STEPS, str(cfg), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), len(metrics.read_text().splitlines())


def test_sigterm_checkpoints_the_last_step_and_resume_reproduces_the_run(tmp_path):
    straight = _config(tmp_path / "a")
    train(load_train_config(straight))
    cfg = _config(tmp_path / "b")
    proc, logged = _signal_after(cfg, signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moetune train: terminated; stopped after step "), proc.stderr
    saved = list_checkpoints(tmp_path / "b" / "run" / "checkpoints")
    assert len(saved) == 1 and f"'{saved[0]}' holds step" in lines[0]
    step = int(saved[0].name.split("-")[1])
    assert 2 <= step < 8 and step == logged  # the step in progress completed, its record was written
    assert not (tmp_path / "b" / "run" / "adapter").exists()
    train(load_train_config(cfg), resume=True)
    a, b = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert len(a) == 8 and a == b
    wa = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigint_without_save_on_interrupt(tmp_path):
    cfg = _config(tmp_path, save_on_interrupt=False)
    proc, _ = _signal_after(cfg, signal.SIGINT, lines=1)
    assert proc.returncode == 130, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moetune train: interrupted; stopped after step "), proc.stderr
    assert "no checkpoint written (checkpoint.save_on_interrupt is false)" in lines[0]
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_several_adapters_stop_the_same_way(tmp_path):
    cfg = _config(tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    adapter = raw.pop("adapter")
    raw["adapters"] = [dict(adapter, name="a"), dict(adapter, name="b", target_modules=["k_proj"])]
    cfg.write_text(yaml.safe_dump(raw))
    proc, logged = _signal_after(cfg, signal.SIGTERM)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) == logged
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_stop_request_defers_the_first_signal_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and isinstance(stop.exception("x"), Terminated)
        with pytest.raises(KeyboardInterrupt):  # a second signal raises at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(Terminated):
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]


def test_handlers_are_left_alone_off_the_main_thread():
    seen = []

    def body():
        with StopRequest():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_save_on_interrupt_is_a_checked_config_key(tmp_path):
    cfg = write_run(tmp_path)
    assert load_train_config(cfg).checkpoint.save_on_interrupt is True
    assert load_train_config(cfg, ["checkpoint.save_on_interrupt=false"]).checkpoint.save_on_interrupt is False
    assert main(["train", str(cfg), "checkpoint.save_on_interupt=false"]) == 2
