"""Exported adapters read by the servers' own loading code, on CPU (issue 17; not in the test run).

For each family and adapter case it exports moetune's per-expert folder, has the reader's own code
assemble the per-expert deltas from it, and compares them with moetune's, and the logits of the base
with the reader's deltas merged in with the trained model's:

- ``--vllm``: vLLM's LoRA loading executed from its source files (``vllm_reader.py``);
- ``--sglang``: SGLang 0.5.23's ``LoRAAdapter`` executed from its source (``sglang_reader.py``), for
  the per-expert folder with and without ``fold_scaling``;
- ``--moe-peft``: a MixLoRA adapter exported in MoE-PEFT's layout, loaded by MoE-PEFT's own
  ``LLMModel.load_adapter`` and run on a tiny Llama, its logits against moetune's (``moe_peft_reader.py``).

    python bench/serving_check.py --vllm /path/containing/vllm   # site-packages or an unpacked wheel
    python bench/serving_check.py --sglang /path/containing/sglang
    python bench/serving_check.py --moe-peft /path/to/MoE-PEFT   # a checkout of github.com/TUDB-Labs/MoE-PEFT

Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import moetune
from moetune.config import LoraConfig
from moetune.model import build_random_model, model_args_from_hf
from moetune.peft.core.inject import add_adapter
from moetune.peft.lora.experts import LoraGroupedExperts
from moe_peft_reader import moe_peft_check  # the bench folder's own modules
from sglang_reader import load_sglang, sglang_read
from vllm_reader import load_vllm, vllm_read

FAMILIES = {  # family -> (vLLM model file, transformers config class, tiny config)
    "mixtral": ("mixtral", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "qwen2_moe",
        "Qwen2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    ),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmoe": ("olmoe", "OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "deepseek_v2",
        "DeepseekV3Config",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, n_group=2, topk_group=1,
        ),
    ),
}  # fmt: skip
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
NEWER = {  # family -> vLLM model file; tiny configs from tests/tiny_families.py and tests/tiny_hybrid.py
    "glm4_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe_lite",
    "minimax_m2": "minimax_m2",
    "qwen3_next": "qwen3_next",
}


def tiny_args(family: str):
    if family in FAMILIES:
        _, cfg_cls, extra = FAMILIES[family]
        return model_args_from_hf(getattr(transformers, cfg_cls)(**SMALL, vocab_size=128, **extra).to_dict())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_families
    import tiny_hybrid

    cfg_cls, _, kwargs = {**tiny_families.CASES, **tiny_hybrid.CASES}[family]
    return model_args_from_hf(getattr(transformers, cfg_cls)(**kwargs).to_dict())


def _experts_8_8(path: str, cfg: LoraConfig) -> LoraConfig:
    return dataclasses.replace(cfg, r=8, alpha=8) if path.endswith(("gate_up_proj", "down_proj")) else cfg


CASES = {  # the adapter: experts at r=8 alpha=8 under r=4 alpha=8 ("patterns"), rsLoRA, one projection only
    "all": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts"]), None),
    "patterns": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts"]), _experts_8_8),
    "rslora": (LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["o_proj", "experts"]), None),
    "rslora_patterns": (LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["o_proj", "experts"]), _experts_8_8),
    "down_only": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts.down_proj"]), None),
}


# --- moetune's side ---------------------------------------------------------------------------
def trained_model(family: str, case: str):
    model = build_random_model(tiny_args(family), std=0.08).eval()
    config, per_module = CASES[case]
    add_adapter(model, config, "default", per_module=per_module)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def our_deltas(model) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in ((p, m) for p, m in model.named_modules() if isinstance(m, LoraGroupedExperts)):
        base, F = layer.base_layer, layer.hidden
        d = {"gate_up_proj": torch.zeros_like(base.gate_up_proj), "down_proj": torch.zeros_like(base.down_proj)}
        rows = {"gate_up": slice(None), "gate": slice(0, F), "up": slice(F, 2 * F), "down": slice(None)}
        for pair in layer.pairs("default"):
            d["down_proj" if pair == "down" else "gate_up_proj"][:, rows[pair]] += layer.delta("default", pair)
        out |= {f"{path}.{k}": v for k, v in d.items()}
    return out


def merged_logits_diff(model, deltas: dict[str, torch.Tensor]) -> float:
    fresh = build_random_model(model.args, std=0.08).eval()
    params = dict(fresh.named_parameters())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d)
        return (fresh(ids).logits - model(ids).logits).abs().max().item()


def compared(row: dict, model, folder: Path, read, errors: tuple[type[Exception], ...]) -> dict:
    """``row`` with the folder's size and how far the deltas ``read(folder)`` (a reader's) are from
    moetune's, and the logits of the base with them merged in from the trained model's; or the
    reader's error."""
    row["bytes"] = (folder / "adapter_model.safetensors").stat().st_size
    try:
        got = read(folder)
    except errors as err:
        return row | {"error": f"{type(err).__name__}: {err}"}
    ours = our_deltas(model)
    row["max_delta_diff"] = max((got[k] - v).abs().max().item() for k, v in ours.items())
    return row | {"max_logit_diff": merged_logits_diff(model, got)}


def vllm_check(vllm: dict, family: str, case: str, tmp: Path) -> dict:
    model = trained_model(family, case)
    folder = moetune.save_adapter(model, tmp / f"{family}-{case}", layout="per_expert")
    row = {"family": family, "case": case, "reader": "vllm (own code)"}
    model_file = FAMILIES[family][0] if family in FAMILIES else NEWER[family]
    return compared(row, model, folder, lambda f: vllm_read(vllm, f, model_file, model), (AssertionError, LookupError))


def sglang_check(sgl: dict, family: str, case: str, tmp: Path, *, fold: bool) -> dict:
    model = trained_model(family, case)
    folder = moetune.save_adapter(model, tmp / f"sg-{family}-{case}-{fold}", layout="per_expert", fold_scaling=fold)
    row = {"family": family, "case": case, "reader": "sglang (own code)", "fold_scaling": fold}
    return compared(row, model, folder, lambda f: sglang_read(sgl, f, model), (AssertionError,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm", type=Path, help="folder holding the vllm package source")
    p.add_argument("--sglang", type=Path, help="folder holding the sglang package source")
    p.add_argument("--moe-peft", type=Path, help="a MoE-PEFT checkout (the folder holding moe_peft/)")
    p.add_argument("--family", action="append", choices=[*FAMILIES, *NEWER], help="default: all")
    ns = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if ns.vllm:
            vllm = load_vllm(ns.vllm)
            for family in ns.family or [*FAMILIES, *NEWER]:
                for case in CASES:
                    print(json.dumps(vllm_check(vllm, family, case, Path(tmp))), flush=True)
        if ns.sglang:
            sgl = load_sglang(ns.sglang)
            for family in ns.family or [*FAMILIES, *NEWER]:
                for case in CASES:
                    for fold in (False, True):
                        print(json.dumps(sglang_check(sgl, family, case, Path(tmp), fold=fold)), flush=True)
        if ns.moe_peft:
            for dropout in (0.0, 0.05):
                llama = transformers.LlamaConfig(**SMALL, vocab_size=128)
                print(json.dumps(moe_peft_check(ns.moe_peft, Path(tmp), dropout, llama)), flush=True)


if __name__ == "__main__":
    main()
