"""A tiny model folder, demo-style data and a run config, for trainer and CLI tests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml

from moetune.demo_data import make_rows, write_jsonl
from moetune.tiny_models import tiny_moe_args
from moetune.model import build_random_model


def tiny_model_dir(root: Path) -> Path:
    out = root / "base"
    if not out.exists():
        build_random_model(tiny_moe_args(272), seed=0, std=0.05).save_pretrained(out)
    return out


def write_run(root: Path, **overrides) -> Path:
    """A run config (YAML) for a tiny LoRA run; ``overrides`` replace whole sections."""
    model = tiny_model_dir(root)
    train = write_jsonl(make_rows("upper", 96, 1), root / "train.jsonl")
    val = write_jsonl(make_rows("upper", 16, 2), root / "val.jsonl")
    cfg = {
        "model": {"path": str(model), "device": "cpu"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "experts"]},
        "data": {"train": str(train), "eval": str(val), "max_length": 48, "tokenizer": "byte"},  # the model has none
        "optim": {"lr": 3e-3, "max_steps": 8, "batch_size": 8, "warmup_steps": 2, "aux_loss_coef": 0.01},
        "checkpoint": {"output_dir": str(root / "run"), "save_every": 1, "keep_last": 3},
        "logging": {"progress": False, "eval_every": 4},
    }
    cfg.update(overrides)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    return [r["loss"] for r in lines if "loss" in r]


KILL_AFTER_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import moetune.train.loop as trainer
    real = trainer.save_checkpoint
    def save_then_die(root, state, **kw):
        path = real(root, state, **kw)
        if state.step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    trainer.save_checkpoint = save_then_die
    from moetune.cli import main
    sys.exit(main(["train", sys.argv[1]]))
    """
)


def train_killed_after(cfg: Path, step: int) -> subprocess.CompletedProcess:
    """``moetune train cfg`` in a subprocess that SIGKILLs itself once checkpoint ``step`` is written."""
    script = KILL_AFTER_SAVE.format(step=step)
    return subprocess.run([sys.executable, "-c", script, str(cfg)], capture_output=True, text=True, timeout=300)


def loraplus_optimizer(params: dict, **kw):
    """``build_optimizer`` with LoRA+ at ratio 16 over base lr 1e-3 (AdamW defaults otherwise); ``kw``:
    its other arguments (``b_side``)."""
    from moetune.train.optim import build_optimizer

    return build_optimizer(params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, loraplus_lr_ratio=16, **kw)


def lr_of(opt) -> dict[int, float]:
    """id(parameter) -> its learning rate in ``opt``."""
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread inside, as the torchrun ranks (OMP_NUM_THREADS=1): the same kernels and rounding,
    and no OpenMP threads spin-waiting on a shared 2-core machine (that can be many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
