"""DeepSeek-V3 aux-loss-free balancing in training: biases move, are checkpointed, resume exactly."""

import torch
import yaml
from safetensors.torch import load_file

from moetune.config import load_train_config
from moetune.demo_data import make_rows, write_jsonl
from moetune.tiny_models import make_tiny
from moetune.train.trainer import train
from train_helpers import losses, train_killed_after


def _config(root, model, speed=1e-2):
    train_file = write_jsonl(make_rows("upper", 48, 1), root / "train.jsonl")
    cfg = {
        "model": {"path": str(model), "device": "cpu"},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_b_proj", "o_proj"]},
        "data": {"train": str(train_file), "max_length": 48},
        "optim": {"lr": 3e-3, "max_steps": 4, "batch_size": 8, "router_bias_update_speed": speed},
        "checkpoint": {"output_dir": str(root / "run"), "save_every": 1},
        "logging": {"progress": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bias_update_moves_biases_and_resumes_exactly(tmp_path):
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
    proc = train_killed_after(b, step=2)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train(load_train_config(b), resume=True)
    # Not bitwise: once routing shifts, CPU grouped GEMMs on the new row counts differ in the last
    # bit between two identical in-process runs too (seen at 5e-7); the biases themselves match.
    la, lb = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    resumed = load_file(str(tmp_path / "b" / "run" / "router_biases.safetensors"))
    assert all(torch.allclose(after[k], resumed[k], atol=1e-7) for k in after)
