"""Tiny random DeepSeek-V2/V3 checkpoints built with transformers itself (parity references)."""

import transformers

from tiny_hf import randomised

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=256,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=64,
    mscale=1.0,
    mscale_all_dim=0.707,
)

# Compressed q, 16 experts in 4 groups of which 2 are kept, top-3 (the V3 and V2.5 releases' routing, scaled down).
GROUPS = dict(q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2)

# name -> (family, config kwargs)
CASES = {
    # V3 as released: compressed q, 4 groups keep 2, sigmoid + bias, shared expert, dense first layer, YaRN.
    "v3_groups_yarn": (
        "v3",
        dict(
            BASE,
            **GROUPS,
            num_hidden_layers=3,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_parameters=YARN,
        ),
    ),
    # V3 variant: direct q_proj, rotate-half rope, no renormalisation, one group, two shared experts.
    "v3_q_proj_half_rope": (
        "v3",
        dict(
            BASE,
            num_hidden_layers=2,
            q_lora_rank=None,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            n_shared_experts=2,
            first_k_dense_replace=0,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            rope_interleave=False,
        ),
    ),
    # V2-Lite-like: direct q_proj, greedy softmax routing, biases everywhere.
    "v2_lite_greedy": (
        "v2",
        dict(
            BASE,
            num_hidden_layers=3,
            q_lora_rank=None,
            n_routed_experts=8,
            num_experts_per_tok=2,
            topk_method="greedy",
            n_shared_experts=2,
            first_k_dense_replace=1,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    # V2/V2.5-like: compressed q, group-limited greedy, scaled weights, YaRN.
    "v2_groups_yarn": (
        "v2",
        dict(
            BASE,
            **GROUPS,
            num_hidden_layers=3,
            topk_method="group_limited_greedy",
            n_shared_experts=1,
            first_k_dense_replace=2,
            routed_scaling_factor=16.0,
            rope_parameters=YARN,
        ),
    ),
}


def make_hf(name: str, seed: int = 0, std: float = 0.08):
    """transformers model of a case, :func:`tiny_hf.randomised` (V3's router correction biases included)."""
    family, kwargs = CASES[name]
    prefix = "DeepseekV3" if family == "v3" else "DeepseekV2"
    config = getattr(transformers, prefix + "Config")(**kwargs)
    return randomised(getattr(transformers, prefix + "ForCausalLM"), config, seed, std)
