"""DeepSeek-V3 aux-loss-free balancing with several adapters trained at once: the biases move on
the routed counts of the whole mixed batch, once per step, are checkpointed and resume exactly."""

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moetune.config import load_train_config
from moetune.demo_data import make_rows, write_jsonl
from moetune.errors import ConfigError
from moetune.tiny_models import make_tiny
from moetune.train.trainer import train
from train_helpers import KILL_AFTER_SAVE

KILL_MULTI_AFTER_SAVE = KILL_AFTER_SAVE  # one loop (moetune.train.loop) for one adapter or several


def _train_killed_after(cfg, step):
    """``moetune train cfg`` (several adapters) in a subprocess that SIGKILLs itself once checkpoint
    ``step`` is written."""
    return subprocess.run(
        [sys.executable, "-c", KILL_MULTI_AFTER_SAVE.format(step=step), str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _config(root, model, speed=1e-2, **second_optim):
    train_file = write_jsonl(make_rows("upper", 48, 1), root / "train.jsonl")
    cfg = {
        "model": {"path": str(model), "device": "cpu"},
        "adapters": [
            {"name": "a", "r": 4, "alpha": 8, "target_modules": ["q_b_proj", "o_proj"]},
            {
                "name": "b",
                "r": 2,
                "alpha": 4,
                "target_modules": ["o_proj"],
                **({"optim": second_optim} if second_optim else {}),
            },
        ],
        "data": {"train": str(train_file), "max_length": 48},
        "optim": {"lr": 3e-3, "max_steps": 4, "batch_size": 4, "router_bias_update_speed": speed},
        "checkpoint": {"output_dir": str(root / "run"), "save_every": 1},
        "logging": {"progress": False},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run):
    import json

    return [
        json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if l and "loss" in json.loads(l)
    ]


def test_biases_move_with_several_adapters_and_resume(tmp_path):
    model = make_tiny("deepseek_v3", tmp_path / "tiny", train_rows=8, eval_rows=2)
    before = {
        k: v
        for k, v in load_file(str(next(model.glob("*.safetensors")))).items()
        if k.endswith("e_score_correction_bias")
    }
    assert before
    a = _config(tmp_path / "a", model)
    train(load_train_config(a))
    after = load_file(str(tmp_path / "a" / "run" / "router_biases.safetensors"))
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k].float()) for k in after)
    b = _config(tmp_path / "b", model)
    proc = _train_killed_after(b, step=2)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train(load_train_config(b), resume=True)
    la, lb = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    resumed = load_file(str(tmp_path / "b" / "run" / "router_biases.safetensors"))
    assert all(torch.allclose(after[k], resumed[k], atol=1e-7) for k in after)


def test_one_speed_per_run(tmp_path):
    model = make_tiny("deepseek_v3", tmp_path / "tiny", train_rows=8, eval_rows=2)
    with pytest.raises(ConfigError, match="router_bias_update_speed"):
        train(load_train_config(_config(tmp_path / "a", model, router_bias_update_speed=0.5)))
