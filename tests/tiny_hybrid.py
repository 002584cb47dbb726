"""Tiny random Qwen3-Next / Qwen3.5-MoE checkpoints built with transformers itself (parity references)."""

import torch
import transformers

from tiny_hf import randomised

TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    max_position_embeddings=256,
)

# name -> (config class, model class, config kwargs)
CASES = {
    # Qwen3-Next as released, scaled down: 3 DeltaNet layers then one gated-attention layer; the
    # second layer has a dense FFN (mlp_only_layers).
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(TEXT, num_hidden_layers=4, intermediate_size=96, mlp_only_layers=[1], norm_topk_prob=True),
    ),
    # Qwen3.5-MoE's text model: split DeltaNet projections, every layer MoE; full attention first.
    "qwen3_5_moe_text": (
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(TEXT, num_hidden_layers=3, layer_types=["full_attention", "linear_attention", "linear_attention"]),
    ),
}


# Qwen3.5-MoE as released: the text model inside the multimodal wrapper, beside a (tiny) vision tower.
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8)


def make_hf_wrapper(seed: int = 0, std: float = 0.08):
    """transformers' Qwen3_5MoeForConditionalGeneration around the qwen3_5_moe_text case."""
    text = dict(CASES["qwen3_5_moe_text"][2], model_type="qwen3_5_moe_text")
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION)
    return _randomised(transformers.Qwen3_5MoeForConditionalGeneration, config, seed, std)


def make_hf(name: str, seed: int = 0, std: float = 0.08):
    """transformers model with N(0, std) weights, norms near their neutral value, and DeltaNet
    decays spread as transformers initialises them."""
    cfg_cls, model_cls, kwargs = CASES[name]
    return _randomised(getattr(transformers, model_cls), getattr(transformers, cfg_cls)(**kwargs), seed, std)


def _deltanet_init(name: str, p) -> bool:
    """DeltaNet decays spread as transformers initialises them; norms near their neutral value."""
    if name.endswith("A_log"):
        p.copy_(torch.empty_like(p).uniform_(0.01, 16).log())
    elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
    elif "norm" in name:
        p.copy_(0.1 * torch.randn_like(p))  # zero-centred: the scale is 1 + w
    else:
        return False
    return True


def _randomised(model_cls, config, seed: int, std: float):
    return randomised(model_cls, config, seed, std, init=_deltanet_init)
