"""MoE-PEFT's own adapter loader and forward on our MixLoRA export (``bench/serving_check.py --moe-peft``).

MoE-PEFT reads transformers-4 config names, so ``rope_theta`` is set on the config for it.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch
import transformers

import moetune
import moetune.config
from moetune.config import LoraConfig


def moe_peft_check(root: Path, tmp: Path, dropout: float, hf_cfg: transformers.LlamaConfig) -> dict:
    """A MixLoRA adapter exported with ``layout="moe_peft"``, loaded by MoE-PEFT's ``LLMModel.load_adapter``
    (its ``torch.load`` of our ``adapter_model.bin``) on a tiny Llama, logits against moetune's."""
    sys.path.insert(0, str(root))
    sys.modules.setdefault("evaluate", types.ModuleType("evaluate"))  # MoE-PEFT's task metrics only
    from moe_peft.common import LLMBatchConfig, LLMModelInput
    from moe_peft.model import LLMModel, from_pretrained

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    hf.save_pretrained(tmp / "llama")
    ours = moetune.load_model(tmp / "llama", dtype=torch.float32).eval()
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    mixture = moetune.config.MixtureConfig(num_experts=3, top_k=2, expert_r=2, expert_alpha=4)
    moetune.add_adapter(ours, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets, mixture=mixture), "mix")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moetune.trainable_parameters(ours, "mix").values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    folder = moetune.save_adapter(ours, tmp / f"mp{dropout}", name="mix", layout="moe_peft")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    hf.config.rope_theta, hf.config.rope_scaling = hf.config.rope_parameters["rope_theta"], None  # transformers-4 names
    llm = LLMModel(from_pretrained(hf, attn_impl="eager", use_sliding_window=False, device="cpu"))
    llm.load_adapter(str(folder), "mix")
    batch = [LLMBatchConfig(adapter_name_="mix", batch_start_idx_=0, batch_end_idx_=2)]
    with torch.no_grad():
        got = llm(LLMModelInput(batch_configs_=batch, batch_tokens_=ids.tolist(), inference_mode_=True))[0].logits
        want = ours(ids, adapter_names=["mix", "mix"]).logits
    row = {"reader": "MoE-PEFT (own loader)", "trained_dropout": dropout, "files": sorted(os.listdir(folder))}
    return row | {"max_logit_diff": (got - want).abs().max().item()}
