"""LoRA on every DeepSeek module vs the real ``peft`` on transformers' DeepSeek-V2/V3, Megatron-style
target aliases, the tiny DeepSeek-V3 example and its 20-step training run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import moetune
from moetune.errors import AdapterError
from moetune.inspect import inspect_model
from moetune.peft.core.aliases import TARGET_ALIASES
from moetune.peft.core.layer import adapter_layers
from moetune.peft.core.targets import plan_targets, targetable_names
from peft_parity import PEFT_FFN_PARAMS, check_peft_reads, linear_grad_gap, logits, peft_model_with, peft_state
from peft_parity import randomise, sample_ids
from tiny_deepseek import make_hf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deepseek_v3_lora.yaml"
# Every DeepSeek LoRA target: MLA projections (q_a/q_b on V3, direct q_proj on V2-Lite), the dense
# MLP of the first layer, the shared experts, the routed experts and the LM head.
CASES = {
    "v3_groups_yarn": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "v2_lite_greedy": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}
FFN = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_experts", "lm_head"]
R, ALPHA = 4, 8


def _pair(case: str, tmp_path: Path, targets: list[str] | None = None):
    """Our model and PEFT's on the same transformers weights with the same non-zero A/B."""
    hf = make_hf(case)
    hf.save_pretrained(tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(
        ours, moetune.LoraConfig(r=R, alpha=ALPHA, target_modules=targets or [*CASES[case], *FFN, "experts"])
    )
    randomise(ours)
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=[*CASES[case], "lm_head"], target_parameters=PEFT_FFN_PARAMS
    )
    pm = peft_model_with(hf, config, peft_state(ours))
    return ours, pm


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_on_every_deepseek_module_matches_peft(case, tmp_path):
    ours, pm = _pair(case, tmp_path)
    groups = {re.sub(r"^model\.layers\.\d+\.", "", path) for path, _ in adapter_layers(ours)}
    assert groups == {
        *(f"self_attn.{t}" for t in CASES[case]),
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "mlp.shared_experts.gate_proj",
        "mlp.shared_experts.up_proj",
        "mlp.shared_experts.down_proj",
        "mlp.experts",
        "lm_head",
    }
    ids = sample_ids()
    ref, got = logits(pm, ids), logits(ours, ids)
    with pm.disable_adapter():
        base = logits(pm, ids)
    err = (ref - got).abs().max().item()
    print(
        f"{case}: moetune vs PEFT (MLA + dense MLP + shared + routed experts + lm_head) max|dlogits| {err:.2e}, "
        f"adapter effect {(ref - base).abs().max().item():.2f}, logit scale {ref.abs().max().item():.2f}"
    )
    assert err <= 1e-4
    assert (ref - base).abs().max() > 1e-2  # the adapters change the output

    worst, _ = linear_grad_gap(ours, pm, ids)  # routed experts: PEFT's (E*r, in) layout, compared through the logits
    print(f"{case}: linear adapters' max relative grad diff vs PEFT {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_adapter_loads_in_peft(case, tmp_path):
    """Saved with Megatron-style names: the file holds HF names and PEFT reproduces our logits."""
    megatron = {
        "q_a_proj": "linear_q_down_proj",
        "q_b_proj": "linear_q_up_proj",
        "q_proj": "linear_q_proj",
        "kv_a_proj_with_mqa": "linear_kv_down_proj",
        "kv_b_proj": "linear_kvb",
        "o_proj": "linear_proj",
    }
    targets = [megatron[t] for t in CASES[case]] + ["linear_fc1", "linear_fc2", "output_layer"]
    ours, _ = _pair(case, tmp_path, targets=targets)
    out = moetune.save_adapter(ours, tmp_path / "adapter")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert not any(t.startswith(("linear_", "output_layer")) for t in saved["target_modules"])
    assert {"gate_proj.weight", "up_proj.weight", "down_proj.weight"} <= set(
        saved["target_parameters"]
    )  # not retargeted by PEFT
    pm, ids = check_peft_reads(case, ours, make_hf(case), out, tol=1e-4)
    assert sum("lora_" in k for k, _ in pm.named_parameters()) == len(peft_state(ours))
    back = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(back, out)
    assert (logits(back, ids) - logits(ours, ids)).abs().max() <= 1e-6


def _plan(model, targets):
    return plan_targets(model, moetune.LoraConfig(r=2, target_modules=list(targets)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_aliases_select_the_same_modules_as_hf_names(case, tmp_path):
    make_hf(case).save_pretrained(tmp_path)
    model = moetune.load_model(tmp_path)
    names = targetable_names(model)
    for alias, hf_names in TARGET_ALIASES.items():
        present = [n for n in hf_names if n in names]
        if not present:
            with pytest.raises(
                AdapterError, match=f"'{alias}' \\(alias of {hf_names[0]}\\) matches no adaptable module"
            ):
                _plan(model, [alias])
            continue
        assert _plan(model, [alias]) == _plan(model, present), alias
    mla = ["linear_q_down_proj", "linear_q_up_proj"] if "v3" in case else ["linear_q_proj"]
    assert _plan(
        model,
        [*mla, "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"],
    ) == _plan(
        model,
        [
            *CASES[case],
            "gate_proj",
            "up_proj",
            "down_proj",
            "experts.gate_proj",
            "experts.up_proj",
            "experts.down_proj",
            "lm_head",
        ],
    )
    report = inspect_model(tmp_path)
    assert "  linear_kv_up_proj   -> kv_b_proj" in report
    assert "linear_fc1          -> gate_proj + up_proj + experts.gate_proj + experts.up_proj" in report
    assert ("linear_q_down_proj" in report) == ("v3" in case)


def test_a_real_module_named_like_an_alias_wins():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.output_layer, self.lm_head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    assert list(_plan(Net(), ["output_layer"])) == ["output_layer"]
    with pytest.raises(AdapterError, match="alias of gate_proj, up_proj"):
        _plan(Net(), ["linear_fc1"])


def test_example_config_trains_the_tiny_deepseek_v3(tmp_path):
    """The example as written (paths moved to tmp): 20 CPU steps lower the loss, metrics carry
    per-MoE-layer router load and entropy, and the tiny model is transformers' DeepSeek-V3."""
    from moetune.config import load_train_config
    from moetune.tiny_models import make_tiny
    from moetune.train.trainer import train

    folder = make_tiny("deepseek_v3", tmp_path / "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = sample_ids(272)
    err = (logits(hf, ids) - logits(moetune.load_model(folder), ids)).abs().max().item()
    assert err <= 1e-4, err

    data = tmp_path / "tiny" / "data"
    config = load_train_config(
        EXAMPLE,
        [
            f"model.path={folder}",
            f"data.train={data / 'upper_train.jsonl'}",
            f"data.eval={data / 'upper_eval.jsonl'}",
            f"checkpoint.output_dir={tmp_path / 'run'}",
            "logging.progress=false",
        ],
    )
    assert (config.adapters[0].r, config.adapters[0].alpha, config.optim.max_steps) == (16, 32, 20)
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in steps]
    print(
        f"tiny DeepSeek-V3 example: loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval {result.eval_loss:.3f}; "
        f"router_max_load {steps[-1]['router_max_load']}, router_entropy {steps[-1]['router_entropy']}"
    )
    assert len(steps) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    for r in steps:  # two MoE layers (layer 0 is dense): one value each
        assert len(r["router_max_load"]) == 2 and len(r["router_entropy"]) == 2
        assert all(1.0 <= v <= 16 for v in r["router_max_load"]) and all(0 < v <= 2.773 for v in r["router_entropy"])
    # the trained adapter (dropout 0.05, routed experts) loads in PEFT and in moetune with the same logits
    adapter = result.adapter_dirs["default"]
    mine = moetune.load_model(folder)
    moetune.load_adapter(mine, adapter)
    mine.eval()  # (dropout modules created by load_adapter follow the model's mode only once inject.py sets it)
    assert mine.get_submodule("model.layers.0.self_attn.q_b_proj").configs["default"].dropout == 0.05
    pm = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    err = (logits(pm, ids) - logits(mine, ids)).abs().max().item()
    print(f"trained example adapter: moetune vs PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-4
