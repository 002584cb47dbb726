"""LoRA on the hybrid linear-attention MoE (DeltaNet projections, gated attention, routed and shared
experts and the shared expert's gate, dense FFN, LM head) vs the real ``peft`` on transformers'
Qwen3-Next; adapter files both ways; per-sample mixed adapters through the DeltaNet layers."""

from __future__ import annotations

import re

import pytest
import torch

import moetune
from moetune.peft.core.layer import adapter_layers
from moetune.peft.core.params import trainable_parameters
from moetune.peft.core.targets import plan_targets
from tiny_hybrid import make_hf

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DENSE = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # layer 1's dense FFN
LINEAR_ATTN = ["in_proj_qkvz", "in_proj_ba", "out_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = [*LINEAR_ATTN, *ATTN, "experts", "shared_expert", "shared_expert_gate", *DENSE, "lm_head"]
# PEFT 0.21 retargets target_modules entries named gate_proj/up_proj/down_proj to the fused experts on
# qwen3_next (transformers' qwen2_moe conversion pattern); the shared expert's and the dense FFN's
# 2D weights are reached through target_parameters instead (same LoRA, same keys).
PEFT_PARAMS = [
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
]
R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_next_lora") / "base"
    make_hf("qwen3_next").save_pretrained(folder)
    return folder


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return (model(ids) if isinstance(model, moetune.CausalLM) else model(input_ids=ids)).logits


def _randomise(model, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _ours(base, targets=TARGETS):
    model = moetune.load_model(base)
    moetune.add_adapter(model, moetune.LoraConfig(r=R, alpha=ALPHA, target_modules=list(targets)))
    _randomise(model)
    return model


def _peft_state(model):
    return {
        f"base_model.model.{path}.{k}": v
        for path, layer in adapter_layers(model)
        for k, v in layer.peft_tensors("default").items()
    }


def _peft_model(state):
    targets = [*LINEAR_ATTN, *ATTN, "shared_expert_gate", "lm_head"]
    pm = peft.get_peft_model(
        make_hf("qwen3_next"),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, target_parameters=PEFT_PARAMS),
    ).eval()
    result = peft.set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    assert sum("lora_" in k for k, _ in pm.named_parameters()) == len(state)  # every PEFT tensor set from ours
    return pm


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
    pm = _peft_model(_peft_state(ours))
    ids = _ids()
    ref, got = _logits(pm, ids), _logits(ours, ids)
    with pm.disable_adapter():
        effect = (ref - _logits(pm, ids)).abs().max().item()
    err = (ref - got).abs().max().item()
    print(f"qwen3_next LoRA on every target vs PEFT: max|dlogits| {err:.2e}, adapter effect {effect:.2f}")
    assert err <= 1e-5 and effect > 1e-1

    ours.train(), pm.train()
    ours(ids, labels=ids).loss.backward()
    pm(input_ids=ids, labels=ids).loss.backward()
    theirs, worst, compared = dict(pm.named_parameters()), 0.0, 0
    for key, p in trainable_parameters(ours).items():
        path, kind, name = key.rsplit(".", 2)
        peer = theirs.get(f"base_model.model.{path}.{kind}.{name}.weight")
        if peer is None:  # routed experts and target_parameters wrappers: compared through the logits
            continue
        compared += 1
        worst = max(worst, ((p.grad - peer.grad).abs().max() / peer.grad.abs().max().clamp_min(1e-12)).item())
    print(f"qwen3_next: {compared} linear adapter grads, max relative diff vs PEFT {worst:.2e}")
    assert compared >= 2 * 4 * 3 and worst <= 1e-4


def test_adapter_files_both_ways(base, tmp_path):
    """Ours -> PeftModel.from_pretrained, and PEFT's save_pretrained -> moetune.load_adapter."""
    ours = _ours(base)
    out = moetune.save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(make_hf("qwen3_next"), str(out)).eval()
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    print(f"qwen3_next: moetune.save_adapter -> PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-5

    theirs = _peft_model(_peft_state(_ours(base)))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.02 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    back = moetune.load_model(base)
    moetune.load_adapter(back, tmp_path / "peft")
    err = (_logits(theirs, ids) - _logits(back, ids)).abs().max().item()
    print(f"qwen3_next: PeftModel.save_pretrained -> moetune.load_adapter max|dlogits| {err:.2e}")
    assert err <= 1e-5


def test_mixed_adapters_per_sample(base):
    ours = _ours(base)
    moetune.add_adapter(
        ours, moetune.LoraConfig(r=2, alpha=2, target_modules=["in_proj_qkvz", "experts"]), name="other"
    )
    _randomise(ours, seed=9)
    ids = _ids()
    with torch.no_grad():
        alone = {n: ours(ids, adapter_names=[n, n]).logits for n in ("default", "other")}
        mixed = ours(ids, adapter_names=["default", "other"]).logits
    assert (mixed[0] - alone["default"][0]).abs().max() <= 1e-5
    assert (mixed[1] - alone["other"][1]).abs().max() <= 1e-5


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
    ids = torch.randint(0, 272, (2, 11), generator=torch.Generator().manual_seed(3))
    err = (_logits(pm, ids) - _logits(mine.eval(), ids)).abs().max().item()
    print(f"trained example adapter: moetune vs PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-5
