"""Qwen3.5-MoE as released (``qwen3_5_moe``: the hybrid text model inside the multimodal wrapper) vs
transformers' Qwen3_5MoeForConditionalGeneration: the text model is loaded, the vision tower skipped
with one log line, adapters name the wrapper's module paths both ways."""

import logging

import pytest
import torch

import moetune
from tiny_hybrid import make_hf_wrapper

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "v_proj", "experts", "shared_expert", "lm_head"]


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_5_moe") / "base"
    hf = make_hf_wrapper()
    hf.save_pretrained(folder)
    return hf, folder


def _logits(model, ids, mask=None):
    with torch.no_grad():
        if isinstance(model, moetune.CausalLM):
            return model(ids, attention_mask=mask).logits
        return model(input_ids=ids, attention_mask=mask).logits


def test_text_model_logits_match_the_wrapper(wrapped, caplog):
    hf, folder = wrapped
    with caplog.at_level(logging.INFO, logger="moetune"):
        ours = moetune.load_model(folder)
    lines = [r.getMessage() for r in caplog.records if "vision" in r.getMessage() or "model.visual" in r.getMessage()]
    assert len(lines) == 1 and "qwen3_5_moe" in lines[0], lines
    assert (ours.args.family, ours.args.wrapper) == ("qwen3_5_moe_text", "qwen3_5_moe")
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, 31:] = 0, 0
    err = (_logits(hf, ids, mask) - _logits(ours, ids, mask))[mask.bool()].abs().max().item()
    print(f"qwen3_5_moe (wrapper): max|dlogits| padded batch {err:.2e}")
    assert err <= 1e-4


def test_saved_text_model_loads_in_transformers(wrapped, tmp_path):
    hf, folder = wrapped
    ours = moetune.load_model(folder)
    ours.save_pretrained(tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text").eval()
    assert type(back).__name__ == "Qwen3_5MoeForCausalLM"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max() <= 1e-5


def test_adapter_files_name_the_wrapper_paths_both_ways(wrapped, tmp_path):
    hf, folder = wrapped
    ours = moetune.load_model(folder)
    moetune.add_adapter(ours, moetune.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in moetune.trainable_parameters(ours).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = moetune.save_adapter(ours, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(make_hf_wrapper(), str(out)).eval()
    lora = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert lora and all(".language_model." in n or "lm_head" in n for n in lora)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    ref, got = _logits(pm, ids), _logits(ours, ids)
    with pm.disable_adapter():
        effect = (ref - _logits(pm, ids)).abs().max().item()
    err = (ref - got).abs().max().item()
    print(
        f"qwen3_5_moe (wrapper): save_adapter -> PeftModel.from_pretrained max|dlogits| {err:.2e}, effect {effect:.2f}"
    )
    assert err <= 1e-5 and effect > 1e-1

    pm.save_pretrained(tmp_path / "peft")
    back = moetune.load_model(folder)
    moetune.load_adapter(back, tmp_path / "peft")
    assert (_logits(back, ids) - ref).abs().max() <= 1e-5
