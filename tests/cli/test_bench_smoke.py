"""The bench scripts run on CPU at toy size: bench/gpu_check.sh --dry-run runs every step of the GPU
check (GPU tests, bench/train_step.py, bench/moe_block.py), both tools compute the same first-step
loss, and moetune saves no more activations than transformers + PEFT."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import saved_activations  # noqa: E402 - a bench script, imported from its folder


def test_gpu_check_dry_run_runs_every_step():
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = Path(proc.stdout.rsplit("results: ", 1)[1].split()[0])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "rc" in r}
    assert set(steps) == {"gpu-tests", "train-step", "moe-block", "multi-adapter"}
    assert all(r["rc"] == 0 for r in steps.values())
    train = [r for r in rows if r.get("step") == "train-step" and "tool" in r]
    assert {r["case"] for r in train} == {"attention", "attention+experts", "attention+experts+ckpt"}
    for case in {r["case"] for r in train}:
        losses = [r["first_loss"] for r in train if r["case"] == case]
        assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-4, (case, losses)
    block = [r for r in rows if r.get("step") == "moe-block" and "tool" in r]
    assert len(block) == 8 and not any("error" in r for r in block), block
    assert all(r["max_abs_diff_vs_transformers"] < 1e-2 for r in block)
    (multi,) = [r for r in rows if r.get("step") == "multi-adapter" and "adapters" in r]
    assert multi["adapters"] == 4 and multi["max_loss_diff"] < 1e-5 and multi["throughput_ratio_wall"] > 0
    assert "block ms" in proc.stdout and "together x" in proc.stdout  # the one table


def test_moetune_saves_less_than_transformers_peft_at_toy_size():
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=32,
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        vocab_size=512,
        num_hidden_layers=2,
        norm_topk_prob=True,
    )
    ours, theirs, _ = saved_activations.measure(cfg, tokens=64, dtype=torch.bfloat16)
    assert ours["tool"] == "moetune" and theirs["tool"] == "transformers+peft"
    assert 0 < ours["bytes_per_token_per_layer"] <= theirs["bytes_per_token_per_layer"], (ours, theirs)


def test_multi_adapter_bench_runs_and_losses_together_equal_alone(capsys):
    import multi_adapter

    assert multi_adapter.main(["--tiny", "--steps", "1", "--layers", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["max_loss_diff"] < 1e-5 and row["throughput_ratio_cpu"] > 0
