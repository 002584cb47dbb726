"""Gradient accumulation weights micro-batches by their counted tokens: batch 2 x accum 4 is batch 8.

The LM loss of a step is the mean over every counted token of the step (labels != -100 after the
shift), whatever the split into micro-batches (and ranks: see tests/train/test_distributed.py). Router
aux losses are per micro-batch (their formula is not a sum over tokens), so these runs turn them off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from moetune.config import load_train_config
from moetune.model.loss import counted_tokens
from moetune.train.setup import prepare_run
from moetune.train.trainer import Trainer, train
from train_helpers import losses, one_torch_thread, write_run

TOL = 1e-6


def _config(root: Path, *, batch_size: int, grad_accum: int, steps: int = 3, adapters: list | None = None) -> Path:
    cfg = write_run(
        root,
        adapter={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "experts"]},
        optim={
            "lr": 3e-3,
            "max_steps": steps,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "warmup_steps": 1,
            "aux_loss_coef": 0.0,
        },
        checkpoint={"output_dir": str(root / "run"), "save_every": 0},
        logging={"progress": False},
    )
    if adapters:
        raw = yaml.safe_load(cfg.read_text())
        del raw["adapter"]
        raw["adapters"] = adapters
        cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _first_step(root: Path, *, batch_size: int, grad_accum: int) -> tuple[dict, dict, list[int]]:
    """Gradients (before clipping), the record and the micro-batches' counted tokens of step 1."""
    config = load_train_config(_config(root, batch_size=batch_size, grad_accum=grad_accum)).single_adapter_view()
    trainer = Trainer(config, prepare_run(config))
    grads, real = {}, trainer.parallel.clip_grad_norm

    def capture(params, max_norm):
        grads.update({i: p.grad.detach().clone() for i, p in enumerate(params) if p.grad is not None})
        return real(params, max_norm)

    trainer.parallel.clip_grad_norm = capture
    job = trainer.jobs[0]
    stream = job.loader.iter_from(job.state)  # the batches the step will draw
    batches = [next(stream) for _ in range(grad_accum)]
    job.batches = job.loader.iter_from(job.state)
    record = trainer.train_step(trainer.jobs)
    return grads, record, [int(counted_tokens(b)) for b, _ in batches]


def test_accumulated_step_equals_the_large_batch(tmp_path):
    big, big_record, _ = _first_step(tmp_path / "big", batch_size=8, grad_accum=1)
    small, small_record, counts = _first_step(tmp_path / "small", batch_size=2, grad_accum=4)
    assert len(set(counts)) > 1, counts  # micro-batches of different token counts: a mean of means would differ
    diff = _max_diff(big, small)
    scale = max(g.abs().max().item() for g in big.values())
    assert diff <= TOL * max(scale, 1.0), (diff, scale)
    assert small_record["loss"] == pytest.approx(big_record["loss"], abs=TOL)  # token-weighted mean of the step
    assert small_record["grad_norm"] == pytest.approx(big_record["grad_norm"], rel=1e-5)
    assert small_record["tokens"] == big_record["tokens"]


def test_accumulated_run_equals_the_large_batch_run(tmp_path):
    train(load_train_config(_config(tmp_path / "big", batch_size=8, grad_accum=1)))
    train(load_train_config(_config(tmp_path / "small", batch_size=2, grad_accum=4)))
    la, lb = losses(tmp_path / "big" / "run"), losses(tmp_path / "small" / "run")
    assert len(la) == len(lb) == 3 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)


def _multi_first_step(root: Path, *, batch_size: int, grad_accum: int) -> tuple[dict, dict]:
    adapters = [
        {"name": "a", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "experts"]},
        {"name": "b", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["k_proj", "o_proj"]},
    ]
    config = load_train_config(_config(root, batch_size=batch_size, grad_accum=grad_accum, adapters=adapters))
    trainer = Trainer(config, prepare_run(config))
    grads, real = {}, trainer.parallel.clip_grad_norm
    keys = {id(p): (j.name, k) for j in trainer.jobs for ps in j.params.values() for k, p in ps.items()}

    def capture(params, max_norm):
        grads.update({keys[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None})
        return real(params, max_norm)

    trainer.parallel.clip_grad_norm = capture
    for j in trainer.jobs:
        j.batches = j.loader.iter_from(j.state)
    return grads, trainer.train_step(trainer.jobs)["adapters"]


def test_accumulation_per_job_equals_the_large_batch(tmp_path):
    big, big_record = _multi_first_step(tmp_path / "big", batch_size=8, grad_accum=1)
    small, small_record = _multi_first_step(tmp_path / "small", batch_size=2, grad_accum=4)
    scale = max(g.abs().max().item() for g in big.values())
    assert _max_diff(big, small) <= TOL * max(scale, 1.0)
    for name in ("a", "b"):
        assert small_record[name]["loss"] == pytest.approx(big_record[name]["loss"], abs=TOL)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_two_ranks_with_accumulation_equal_one_large_batch(tmp_path):
    """2 ranks x batch 2 x grad_accum 2 reads the rows of one batch of 8 per step: same run."""
    from test_distributed import _assert_same_run, _torchrun

    with one_torch_thread():  # like the ranks: same kernels, same rounding
        train(load_train_config(_config(tmp_path / "big", batch_size=8, grad_accum=1)))
    _torchrun(_config(tmp_path / "ranks", batch_size=2, grad_accum=2), "distributed.strategy=replicate")
    _assert_same_run(tmp_path / "big" / "run", tmp_path / "ranks" / "run")
