"""LoRA on the hybrid linear-attention MoE (DeltaNet projections, gated attention, routed and shared
experts and the shared expert's gate, dense FFN, LM head) vs the real ``peft`` on transformers'
Qwen3-Next; adapter files both ways; per-sample mixed adapters through the DeltaNet layers."""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch

import moetune
from moetune.peft.core.targets import plan_targets
from peft_parity import PEFT_FFN_PARAMS, check_files_both_ways, check_mixed_adapters_per_sample, logits, peft_model_with
from peft_parity import check_logits_match_peft, linear_grad_gap, peft_state, randomise, sample_ids
from tiny_hybrid import make_hf

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DENSE = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # layer 1's dense FFN
LINEAR_ATTN = ["in_proj_qkvz", "in_proj_ba", "out_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = [*LINEAR_ATTN, *ATTN, "experts", "shared_expert", "shared_expert_gate", *DENSE, "lm_head"]
R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_next_lora") / "base"
    make_hf("qwen3_next").save_pretrained(folder)
    return folder


def _ours(base, targets=TARGETS):
    model = moetune.load_model(base)
    moetune.add_adapter(model, moetune.LoraConfig(r=R, alpha=ALPHA, target_modules=list(targets)))
    randomise(model)
    return model


def _peft_model(state):
    targets = [*LINEAR_ATTN, *ATTN, "shared_expert_gate", "lm_head"]
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, target_parameters=PEFT_FFN_PARAMS)
    return peft_model_with(make_hf("qwen3_next"), config, state)


def test_targets_reach_every_hybrid_module(base):
    model = moetune.load_model(base)
    plan = plan_targets(model, moetune.LoraConfig(r=2, target_modules=TARGETS))
    groups = {re.sub(r"^model\.layers\.\d+\.", "", p) for p in plan}
    assert groups == {
        *(f"linear_attn.{t}" for t in LINEAR_ATTN),
        *(f"self_attn.{t}" for t in ATTN),
        "mlp.experts",
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
        "mlp.shared_expert_gate",
        *DENSE,
        "lm_head",
    }
    # the shared expert's gate and the routers only when named; the conv is not a linear
    plain = plan_targets(model, moetune.LoraConfig(r=2, target_modules="all-linear"))
    assert not any(p.endswith(("shared_expert_gate", "mlp.gate", "conv1d")) for p in plain)
    assert any(p.endswith("linear_attn.in_proj_qkvz") for p in plain)


def test_lora_matches_peft_logits_and_grads(base):
    ours = _ours(base)
    pm = _peft_model(peft_state(ours))
    ids = sample_ids()
    check_logits_match_peft("qwen3_next LoRA on every target", pm, ours, ids)

    worst, compared = linear_grad_gap(ours, pm, ids)
    print(f"qwen3_next: {compared} linear adapter grads, max relative diff vs PEFT {worst:.2e}")
    assert compared >= 2 * 4 * 3 and worst <= 1e-4


def test_adapter_files_both_ways(base, tmp_path):
    """Ours -> PeftModel.from_pretrained, and PEFT's save_pretrained -> moetune.load_adapter."""
    hf = partial(make_hf, "qwen3_next")
    check_files_both_ways(
        "qwen3_next", base, tmp_path, ours=partial(_ours, base), make_hf=hf, theirs=_peft_model, noise=0.02
    )


def test_mixed_adapters_per_sample(base):
    other = moetune.LoraConfig(r=2, alpha=2, target_modules=["in_proj_qkvz", "experts"])
    check_mixed_adapters_per_sample(_ours(base), other)


def test_example_config_trains_the_tiny_qwen3_5_moe(tmp_path):
    """examples/qwen3_5_moe_lora.yaml as written (paths moved to tmp): 20 CPU steps lower the loss, and
    the trained adapter loads in PEFT on transformers' Qwen3_5MoeForCausalLM with our logits."""
    import json
    from pathlib import Path

    import transformers

    from moetune.config import load_train_config
    from moetune.tiny_models import make_tiny
    from moetune.train.trainer import train

    folder = make_tiny("qwen3_5_moe", tmp_path / "tiny")
    data = tmp_path / "tiny" / "data"
    example = Path(__file__).resolve().parents[2] / "examples" / "qwen3_5_moe_lora.yaml"
    overrides = [f"model.path={folder}", f"data.train={data / 'upper_train.jsonl'}"]
    overrides += [f"data.eval={data / 'upper_eval.jsonl'}", f"checkpoint.output_dir={tmp_path / 'run'}"]
    result = train(load_train_config(example, [*overrides, "logging.progress=false"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"tiny Qwen3.5-MoE example: loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval {result.eval_loss:.3f}")
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3_5MoeForCausalLM"
    mine = moetune.load_model(folder)
    moetune.load_adapter(mine, result.adapter_dirs["default"])
    pm = peft.PeftModel.from_pretrained(hf, str(result.adapter_dirs["default"])).eval()
    ids = sample_ids(272)
    err = (logits(pm, ids) - logits(mine.eval(), ids)).abs().max().item()
    print(f"trained example adapter: moetune vs PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-5
