"""Exported adapters as the servers read them (issue 17): the per-expert layout through vLLM's and
SGLang's loading rules (tests/peft/serving_readers.py, cited there step by step), PEFT itself on the
same folders, and moetune reading them back with and without its metadata file.

The figure each test checks is the logits of the base with the reader's assembled deltas merged in,
against the trained model (fp32)."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
import transformers

import moetune
from moetune.config import LoraConfig
from moetune.model import build_random_model
from moetune.model.families import model_args_from_hf
from moetune.peft.core.inject import add_adapter
from moetune.peft.lora.experts import LoraGroupedExperts
from moetune.tiny_models import tiny_model_args
from serving_readers import VLLM_EXPERTS, merge_deltas, sglang_deltas, vllm_deltas
from tiny_families import CASES as FAMILY_CASES
from tiny_hf import CASES

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def _args(family: str):
    if family == "deepseek_v3":
        return tiny_model_args(family, vocab_size=128)
    cfg_cls, _, kwargs = {**CASES, **FAMILY_CASES}[family]
    return model_args_from_hf(getattr(transformers, cfg_cls)(**kwargs).to_dict())


def _trained(family: str, config: LoraConfig, per_module=None, seed: int = 3):
    """A tiny model of ``family`` with adapter 'default' at random (non-zero) values."""
    model = build_random_model(_args(family), std=0.08).eval()
    add_adapter(model, config, "default", per_module=per_module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _experts(model) -> list[tuple[str, int]]:
    return [(p, m.num_experts) for p, m in model.named_modules() if isinstance(m, LoraGroupedExperts)]


def _fresh(model):
    return build_random_model(model.args, std=0.08).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _experts_8_8(path: str, cfg: LoraConfig) -> LoraConfig:
    """Experts at r=8, alpha=8 under the adapter's r=4, alpha=8 (scaling 1 instead of 2)."""
    return dataclasses.replace(cfg, r=8, alpha=8) if path.endswith(("gate_up_proj", "down_proj")) else cfg


CASES_EXPORT = {  # name -> (LoraConfig, per_module)
    "all": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts"]), None),
    "patterns": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts"]), _experts_8_8),
    "rslora_patterns": (LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["o_proj", "experts"]), _experts_8_8),
    "down_only": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts.down_proj"]), None),
    "gate_only": (LoraConfig(r=4, alpha=8, target_modules=["experts.gate_proj"]), None),
}


VLLM_CASES = (
    [(f, "all") for f in FAMILIES]
    + [(f, c) for f in ("mixtral", "deepseek_v3") for c in ("patterns", "rslora_patterns", "down_only")]
    + [("qwen3_moe", "gate_only"), ("minimax_m2", "down_only"), ("glm4_moe", "all")]
)


@pytest.mark.parametrize(("family", "case"), VLLM_CASES)
def test_per_expert_export_as_vllm_reads_it(family, case, tmp_path):
    """Defects 1-3: names vLLM's model defines (Mixtral: block_sparse_moe.experts.{e}.w1/w2/w3),
    rank/alpha patterns of the experts (rsLoRA too), zero pairs for untargeted projections (pack_moe
    needs all three)."""
    config, per_module = CASES_EXPORT[case]
    trained = _trained(family, config, per_module)
    out = moetune.save_adapter(trained, tmp_path / "vllm", layout="per_expert")
    deltas = vllm_deltas(out, family, _experts(trained))
    block, names = VLLM_EXPERTS[family]
    keys = json.loads((out / "adapter_config.json").read_text())
    assert any(f".{block}.experts.0.{names[1]}." in k for k in _keys(out)), keys
    for path, layer in _experts(trained):
        m = trained.get_submodule(path)
        ours = _our_expert_deltas(m)
        for param, d in ours.items():
            err = (deltas[f"{path}.{param}"] - d).abs().max().item()
            assert err <= 1e-6, (path, param, err)
    err = (_logits(merge_deltas(_fresh(trained), deltas), IDS) - _logits(trained, IDS)).abs().max().item()
    print(f"{family} {case}: per_expert -> vLLM's assembly -> merged logits max|d| {err:.2e}")
    assert err <= 1e-5


def _keys(folder) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _our_expert_deltas(layer: LoraGroupedExperts) -> dict[str, torch.Tensor]:
    """moetune's own merged deltas of adapter 'default' per base parameter (zeros where untargeted)."""
    base = layer.base_layer
    out = {"gate_up_proj": torch.zeros_like(base.gate_up_proj), "down_proj": torch.zeros_like(base.down_proj)}
    F = layer.hidden
    rows = {"gate_up": slice(None), "gate": slice(0, F), "up": slice(F, 2 * F), "down": slice(None)}
    for pair in layer.pairs("default"):
        out["down_proj" if pair == "down" else "gate_up_proj"][:, rows[pair]] += layer.delta("default", pair)
    return out


@pytest.mark.parametrize(
    ("family", "case"), [("mixtral", "rslora_patterns"), ("qwen3_moe", "patterns"), ("deepseek_v3", "down_only")]
)
def test_sglang_reads_folded_export(family, case, tmp_path):
    """Defect 4: SGLang scales every module by lora_alpha / r at rank r; fold_scaling writes s * B
    at one rank with alpha = r, so SGLang's deltas are the trained ones (unfolded, they are not)."""
    config, per_module = CASES_EXPORT[case]
    trained = _trained(family, config, per_module)
    folded = moetune.save_adapter(trained, tmp_path / "sglang", layout="per_expert", fold_scaling=True)
    cfg = json.loads((folded / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and not cfg["rank_pattern"] and not cfg["use_rslora"], cfg
    want = _logits(trained, IDS)
    err = (_logits(merge_deltas(_fresh(trained), sglang_deltas(folded, _experts(trained))), IDS) - want).abs().max()
    print(f"{family} {case}: per_expert --fold-scaling -> SGLang's scaling -> merged logits max|d| {err:.2e}")
    assert err <= 1e-5
    back = _fresh(trained)
    moetune.load_adapter(back, folded)
    assert (_logits(back, IDS) - want).abs().max() <= 1e-5
    if case != "down_only":  # unfolded, SGLang refuses the experts' rank 8 (r 4) or scales rsLoRA by alpha/r
        plain = moetune.save_adapter(trained, tmp_path / "plain", layout="per_expert")
        try:
            wrong = _logits(merge_deltas(_fresh(trained), sglang_deltas(plain, _experts(trained))), IDS)
        except AssertionError as err:
            assert "mem_pool" in str(err)
        else:
            assert (wrong - want).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("family", "case"), [("mixtral", "rslora_patterns"), ("qwen2_moe", "down_only"), ("deepseek_v3", "gate_only")]
)
def test_moetune_reads_per_expert_folders_with_and_without_metadata(family, case, tmp_path):
    """Defect 6 (moetune's side): a per-expert folder reads back exactly with moetune_adapter.json
    and without it (targets from the file: zero pairs of untargeted projections are not targets)."""
    config, per_module = CASES_EXPORT[case]
    trained = _trained(family, config, per_module)
    out = moetune.save_adapter(trained, tmp_path / "vllm", layout="per_expert")
    want = _logits(trained, IDS)
    for label in ("with metadata", "without metadata"):
        back = _fresh(trained)
        moetune.load_adapter(back, out)
        err = (_logits(back, IDS) - want).abs().max().item()
        print(f"{family} {case} {label}: per_expert -> moetune.load_adapter logits max|d| {err:.2e}")
        assert err <= 1e-5
        pairs = {p: sorted(m.pairs("default")) for p, m in back.named_modules() if isinstance(m, LoraGroupedExperts)}
        assert pairs == {p: sorted(trained.get_submodule(p).pairs("default")) for p in pairs}, label
        (out / "moetune_adapter.json").unlink(missing_ok=True)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_peft_refuses_per_expert_folders(family, tmp_path):
    """Defect 6 (PEFT's side): the real peft refuses a per-expert folder (it would map the
    per-expert names onto transformers-5 fused experts wrongly for some families) with a message
    that says what to do; PEFT's own layout still loads."""
    from tiny_hf import make_hf_model

    trained = _trained(family, CASES_EXPORT["all"][0])
    out = moetune.save_adapter(trained, tmp_path / "vllm", layout="per_expert")
    with pytest.raises(ValueError, match="Invalid task type.*EXPORT_LAYOUT_PEFT_FOR_PEFT"):
        peft.PeftModel.from_pretrained(make_hf_model(family), str(out))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_transformers4_era_per_expert_adapter_reads_exactly(family, tmp_path):
    """An adapter saved by PEFT on transformers 4 (LLaMA-Factory and the like): per-expert nn.Linear
    keys (Mixtral: block_sparse_moe.experts.{e}.w1/w2/w3), separate gate and up A's, target_modules by
    checkpoint name, task_type CAUSAL_LM, no moetune metadata; it reads onto the fused experts exactly."""
    trained = _trained(family, CASES_EXPORT["all"][0])
    gen = torch.Generator().manual_seed(5)
    for path, _ in _experts(trained):  # separate gate / up A's, as per-Linear training gives
        layer = trained.get_submodule(path)
        tensors = layer.per_expert_tensors("default")
        for k in [k for k in tensors if ".up_proj.lora_A" in k]:
            tensors[k] = torch.randn(tensors[k].shape, generator=gen) * 0.1
        layer.load_per_expert_tensors("default", tensors, where="test")
    out = moetune.save_adapter(trained, tmp_path / "v4", layout="per_expert")
    (out / "moetune_adapter.json").unlink()
    cfg = json.loads((out / "adapter_config.json").read_text())
    names = ["w1", "w2", "w3"] if family == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
    cfg |= {"task_type": "CAUSAL_LM", "target_modules": ["o_proj", *names]}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    back = _fresh(trained)
    moetune.load_adapter(back, out)
    err = (_logits(back, IDS) - _logits(trained, IDS)).abs().max().item()
    print(f"{family}: transformers-4-era per-expert adapter -> moetune logits max|d| {err:.2e}")
    assert err <= 1e-5


def test_vllm_export_warns_about_kv_b_proj(caplog):
    """vLLM's MLA decode multiplies by W_UK/W_UV split from the base kv_b_proj at load
    (mla_attention.py: process_weights_after_loading): a kv_b_proj LoRA changes prefill only."""
    from moetune.peft.formats.per_expert import check_vllm_export

    model = _trained("deepseek_v3", LoraConfig(r=4, alpha=8, target_modules=["kv_b_proj", "experts"]))
    with caplog.at_level("WARNING"):
        check_vllm_export(model, "default", fused=False)
    assert any("prefill but not decode" in r.getMessage() for r in caplog.records)
    caplog.clear()
    check_vllm_export(_trained("deepseek_v3", CASES_EXPORT["all"][0]), "default", fused=False)
    assert not caplog.records
