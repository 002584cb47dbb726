"""fp16 runs train with a GradScaler (issue 16): the loss is scaled, gradients are unscaled before
clipping, a step whose gradients overflow is skipped and the scale backs off, and the scaler's state
is in checkpoints so ``--resume`` continues with the same scale. fp16 runs on the CPU here
(``torch.amp.GradScaler("cpu")``); on CUDA the same code runs with the scaler on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_model_dir, write_run

import moetune
from moetune.config import load_train_config
from moetune.errors import ConfigError
from moetune.train.distributed import LaunchEnv, resolve_launch
from moetune.train.trainer import train

INIT_SCALE = 2.0**16  # torch.amp.GradScaler's default


def _config(root: Path, *extra: str):
    path = write_run(
        root,
        checkpoint={"output_dir": str(root / "run"), "save_every": 1, "keep_last": 10},
        logging={"progress": False, "eval_every": 0},
    )
    return load_train_config(path, ["model.dtype=fp16", "adapter.dropout=0.0", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l and "loss" in json.loads(l)]


def _overflowing_model(root: Path, step: int):
    """The tiny model in fp16 whose final-norm output gets an infinite gradient in training forward ``step``."""
    model = moetune.load_model(tiny_model_dir(root), dtype=torch.float16)
    calls = {"n": 0}

    def poison(module, args, output):
        if output.requires_grad and module.training:
            calls["n"] += 1
            if calls["n"] == step:
                output.register_hook(lambda g: torch.full_like(g, float("inf")))
        return output

    model.model.norm.register_forward_hook(poison)
    return model


def test_fp16_run_trains_with_a_loss_scale(tmp_path):
    result = train(_config(tmp_path))
    records = _records(tmp_path / "run")
    assert len(records) == 8 and not any(r["skipped"] for r in records)
    assert all(r["loss_scale"] == INIT_SCALE for r in records)  # no overflow: the scale stays (growth after 2000 steps)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3, result.losses
    assert all(
        torch.isfinite(t).all()
        for t in load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")).values()
    )


def test_overflow_step_is_skipped_the_scale_backs_off_and_resume_keeps_it(tmp_path):
    config = _config(tmp_path)
    result = train(config, model=_overflowing_model(tmp_path, step=2))
    straight = _records(tmp_path / "run")
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert result.skipped_steps == 1 and [r["step"] for r in straight if r["skipped"]] == [2]
    scales = [r["loss_scale"] for r in straight]
    assert scales[:2] == [INIT_SCALE, INIT_SCALE] and scales[2:] == [INIT_SCALE / 2] * 6, scales  # backoff 0.5
    assert all(torch.isfinite(t).all() for t in weights.values())
    # resume from step 3 (after the overflow) on a fresh model: the scale must be the backed-off one
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000003"
    train(config, resume=str(checkpoint), model=moetune.load_model(tiny_model_dir(tmp_path), dtype=torch.float16))
    resumed = _records(tmp_path / "run")
    assert [r["loss_scale"] for r in resumed] == scales
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    again = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_fp16_with_fsdp_is_refused(tmp_path):
    config = _config(tmp_path, "distributed.strategy=fsdp")
    with pytest.raises(ConfigError, match="fp16"):
        resolve_launch(config, LaunchEnv(rank=0, world_size=2, local_rank=0))
