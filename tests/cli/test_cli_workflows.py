"""The CLI end to end on a tiny model: train (example config), eval, generate, merge, export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moetune
from train_helpers import tiny_model_dir
from moetune.demo_data import make_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "moetune", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model_dir(root)
    train = write_jsonl(make_rows("upper", 64, 1), root / "data" / "upper_train.jsonl")
    val = write_jsonl(make_rows("upper", 16, 3), root / "data" / "upper_eval.jsonl")
    out = _cli(
        "train",
        ROOT / "examples" / "tiny_qwen3_moe.yaml",
        f"model.path={model}",
        f"data.train={train}",
        f"data.eval={val}",
        f"checkpoint.output_dir={root / 'run'}",
        "optim.max_steps=4",
        "optim.warmup_steps=1",
        "optim.batch_size=8",
        "logging.progress=false",
    )
    assert "adapter 'upper'" in out
    return root, model, root / "run" / "adapter", val


def test_example_config_prints_resolved_config(trained):
    root, model, _, _ = trained
    out = _cli("train", ROOT / "examples" / "tiny_qwen3_moe.yaml", f"model.path={model}", "--print-config")
    assert f"path: {model}" in out and "experts" in out


def test_eval_reports_loss_and_perplexity(trained):
    root, model, adapter, val = trained
    base = _cli("eval", "--model", model, "--data", val)
    tuned = _cli("eval", "--model", model, "--adapter", adapter, "--data", val)
    assert "perplexity" in base and "perplexity" in tuned
    assert base != tuned


def test_generate_greedy_and_sampled(trained):
    _, model, adapter, _ = trained
    greedy = _cli("generate", "--model", model, "--adapter", adapter, "--prompt", "upper: abc", "--max-new-tokens", "5")
    again = _cli("generate", "--model", model, "--adapter", adapter, "--prompt", "upper: abc", "--max-new-tokens", "5")
    assert greedy == again
    _cli(
        "generate",
        "--model",
        model,
        "--prompt",
        "upper: abc",
        "--prompt",
        "copy: xy",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--max-new-tokens",
        "5",
    )


def test_merge_writes_checkpoint_with_adapted_logits(trained, tmp_path):
    _, model, adapter, _ = trained
    _cli("merge", "--model", model, "--adapter", adapter, "--out", tmp_path / "merged")
    merged = moetune.load_model(tmp_path / "merged")
    live = moetune.load_model(model)
    moetune.load_adapter(live, adapter)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (merged(ids).logits - live(ids).logits).abs().max() < 1e-5


def test_export_per_expert_layout(trained, tmp_path):
    _, model, adapter, _ = trained
    _cli("export", "--model", model, "--adapter", adapter, "--out", tmp_path / "vllm", "--layout", "per_expert")
    with safe_open(str(tmp_path / "vllm" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".mlp.experts.0.gate_proj.lora_A.weight" in k for k in keys), keys[:5]
    assert json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_export_for_sglang_folds_the_scaling(trained, tmp_path):
    """``export --for sglang``: per-expert keys, scaling folded into B (alpha = r, no rsLoRA or
    patterns), and the folder reads back with the trained adapter's logits."""
    _, model, adapter, _ = trained
    out = _cli("export", "--model", model, "--adapter", adapter, "--out", tmp_path / "sg", "--for", "sglang")
    assert "scaling folded into B" in out
    cfg = json.loads((tmp_path / "sg" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and not cfg["use_rslora"] and not cfg["rank_pattern"], cfg
    folded, live = moetune.load_model(model), moetune.load_model(model)
    moetune.load_adapter(folded, tmp_path / "sg")
    moetune.load_adapter(live, adapter)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (folded(ids).logits - live(ids).logits).abs().max() < 1e-5


def test_export_plan_refuses_contradictions():
    from moetune.errors import ConfigError
    from moetune.workflows import export_plan

    assert export_plan(None, None, False) == ("peft", False)
    assert export_plan(None, "sglang", False) == ("per_expert", True)
    assert export_plan("per_expert", "vllm", False) == ("per_expert", False)
    with pytest.raises(ConfigError, match="--layout peft contradicts --for vllm"):
        export_plan("peft", "vllm", False)
