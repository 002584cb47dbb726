"""LoRA on every projection of the 2025-26 MoE families (attention, dense FFN, shared and routed
experts, LM head) vs the real ``peft`` on transformers' model, and adapter files both ways."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import moetune
from moetune.model.wrappers import wrapped_path
from moetune.peft.core.layer import adapter_layers
from peft_parity import check_logits_match_peft, logits, peft_model_with, peft_state, randomise, sample_ids
from tiny_families import CASES, make_hf

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GQA = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
ATTENTION = {"glm4_moe": GQA, "glm4_moe_lite": MLA, "minimax_m2": GQA, "mistral4": MLA, "kimi_k25": MLA}
# Dense-MLP and shared-expert linears go to PEFT as 2D target_parameters: PEFT 0.21 retargets
# target_modules entries named gate_proj/up_proj/down_proj to the routed experts on these model
# types (see moetune.peft.formats.peft_config.PEFT_RETARGETED_NAMES).
DENSE_PARAMS = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
DENSE = ["gate_proj", "up_proj", "down_proj", "shared_experts"]  # dense-FFN layers and shared experts
NO_DENSE = {"minimax_m2"}  # every layer MoE, no shared expert
R, ALPHA = 4, 8
NAMES = sorted(CASES)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """name -> folder of the transformers checkpoint (written once per module)."""
    folders = {}

    def get(name: str):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name)
            make_hf(name).save_pretrained(folders[name])
        return folders[name]

    return get


def _ffn(name: str) -> list[str]:
    return ["experts", "lm_head"] + ([] if name in NO_DENSE else DENSE)


def _ours(name: str, folder):
    model = moetune.load_model(folder)
    moetune.add_adapter(model, moetune.LoraConfig(r=R, alpha=ALPHA, target_modules=[*ATTENTION[name], *_ffn(name)]))
    randomise(model)
    return model


def _peft_config(name: str):
    return peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=[*ATTENTION[name], "lm_head"],
        target_parameters=EXPERT_PARAMS + ([] if name in NO_DENSE else DENSE_PARAMS),
    )


@pytest.mark.parametrize("name", NAMES)
def test_lora_everywhere_matches_peft(name, base):
    """Our adapter tensors set into PEFT's model give PEFT's logits; every module kind is adapted;
    a second adapter chosen per sample in the same batch equals each adapter run alone."""
    ours = _ours(name, base(name))
    kinds = {path.split(".")[-1] if "experts" not in path else "experts" for path, _ in adapter_layers(ours)}
    dense = set() if name in NO_DENSE else {"gate_proj", "up_proj", "down_proj"}
    assert {*ATTENTION[name], *dense, "experts", "lm_head"} <= kinds
    assert any(".shared_experts." in path for path, _ in adapter_layers(ours)) == (name not in NO_DENSE)
    state = peft_state(ours, path=partial(wrapped_path, ours.args.wrapper))  # Kimi-K2.5: the wrapper's paths
    pm = peft_model_with(make_hf(name), _peft_config(name), state)
    ids = sample_ids()
    check_logits_match_peft(f"{name}: LoRA everywhere", pm, ours, ids, effect=1e-2)

    moetune.add_adapter(ours, moetune.LoraConfig(r=2, alpha=4, target_modules=[*ATTENTION[name], *_ffn(name)]), "other")
    randomise(ours, seed=7, adapter="other")
    mixed = logits(ours, ids, adapter_names=["default", "other"])
    alone = [logits(ours, ids[i : i + 1], adapter_names=[a]) for i, a in enumerate(["default", "other"])]
    assert (mixed - torch.cat(alone)).abs().max() <= 1e-5
    assert (alone[0] - logits(ours, ids[:1], adapter_names=["other"])).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_adapter_files_both_ways(name, base, tmp_path):
    """moetune.save_adapter -> PeftModel.from_pretrained; PEFT's save_pretrained -> moetune.load_adapter;
    the per-expert serving layout (vLLM / SGLang expert names for the family) reads back."""
    from safetensors import safe_open

    ours = _ours(name, base(name))
    out = moetune.save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(make_hf(name), str(out)).eval()
    ids = sample_ids()
    err = (logits(ours, ids) - logits(pm, ids)).abs().max().item()

    theirs = peft.get_peft_model(make_hf(name), _peft_config(name)).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    back = moetune.load_model(base(name))
    moetune.load_adapter(back, tmp_path / "peft")
    err_back = (logits(theirs, ids) - logits(back, ids)).abs().max().item()
    print(f"{name}: ours -> PeftModel max|dlogits| {err:.2e}; PEFT's file -> moetune {err_back:.2e}")
    assert err <= 1e-5 and err_back <= 1e-5

    serving = moetune.save_adapter(ours, tmp_path / "serving", layout="per_expert")
    with safe_open(str(serving / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # vLLM's module path and checkpoint names for MiniMax-M2's experts: block_sparse_moe.experts.{e}.w1
    where = "block_sparse_moe.experts.0.w1" if name == "minimax_m2" else "mlp.experts.0.gate_proj"
    assert any(k.endswith(f".{where}.lora_A.weight") for k in keys), keys[:5]
    # a wrapped text model (Kimi-K2.5) is written under the text model's names, what servers read
    assert all(k.startswith("base_model.model.model.layers.") or "lm_head" in k for k in keys), keys[:5]
    moetune.load_adapter(back, serving, name="serving")
    assert (logits(back, ids, adapter_names=["serving"] * 2) - logits(ours, ids)).abs().max() <= 1e-5
