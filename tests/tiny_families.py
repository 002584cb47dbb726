"""Tiny random checkpoints of the 2025-26 MoE families (GLM-4.5, GLM-4.7-Flash, MiniMax-M2,
Mistral 4, Kimi-K2.x), built and saved by transformers itself as parity references."""

from __future__ import annotations

import transformers

from tiny_hf import randomised

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, max_position_embeddings=256)
# Latent attention with a compressed query, 4 heads, 8 routed experts (GLM-4.7-Flash, Mistral 4, Kimi-K2.5).
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=24)
MLA |= dict(num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8)

# name -> (config class, causal-LM class, config kwargs)
CASES: dict[str, tuple[str, str, dict]] = {
    # GLM-4.5 as released, scaled down: q/k norm, q/k/v biases, partial RoPE 0.5 (the default),
    # one dense layer, 8 experts in 2 groups (keep 1), shared expert, routed scaling.
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            BASE,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            use_qk_norm=True,
            attention_bias=True,
            first_k_dense_replace=1,
        ),
    ),
    # GLM-4.7-Flash: latent attention with a compressed query, sparse layers from mlp_layer_types.
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        "Glm4MoeLiteForCausalLM",
        dict(
            BASE,
            **MLA,
            num_hidden_layers=3,
            num_experts_per_tok=3,
            routed_scaling_factor=1.8,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    # MiniMax-M2: every layer MoE, sigmoid router with bias, q/k norm over all heads, partial RoPE.
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(
            BASE,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            partial_rotary_factor=0.5,
            bos_token_id=None,
            eos_token_id=None,
        ),
    ),
    # Mistral 4: MLA, softmax routing over 2 groups (keep 1), shared expert, one dense layer; the
    # Llama-4 query temperature changes every 4 positions (original_max_position_embeddings 4).
    "mistral4": (
        "Mistral4Config",
        "Mistral4ForCausalLM",
        dict(
            BASE,
            **MLA,
            num_hidden_layers=3,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=4,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale=1.0,
                mscale_all_dim=1.0,
                llama_4_scaling_beta=0.5,
            ),
        ),
    ),
    # Kimi-K2.5: a DeepSeek-V3 text model (text_config model_type kimi_k2) inside the vision wrapper.
    "kimi_k25": (
        "Kimi_K25Config",
        "Kimi_K25ForConditionalGeneration",
        dict(
            text_config=dict(
                BASE,
                **MLA,
                model_type="kimi_k2",
                num_hidden_layers=2,
                num_experts_per_tok=2,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1,
                tie_word_embeddings=False,
            ),
            vision_config=dict(
                patch_size=2,
                pos_emb_height=4,
                pos_emb_width=4,
                pos_emb_time=2,
                num_attention_heads=2,
                num_hidden_layers=1,
                hidden_size=16,
                intermediate_size=32,
            ),
            projection_hidden_size=16,
            tie_word_embeddings=False,
        ),
    ),
}


def make_hf(name: str, seed: int = 0, std: float = 0.08):
    """transformers model of a case, :func:`tiny_hf.randomised` (router correction biases included)."""
    cfg_cls, model_cls, kwargs = CASES[name]
    return randomised(getattr(transformers, model_cls), getattr(transformers, cfg_cls)(**kwargs), seed, std)
