"""The adapter tests' tiny models: a Llama and a Qwen2-MoE config.json (hidden 32, vocab 64), built
by moetune directly with random weights (no transformers model needed)."""

from __future__ import annotations

from moetune.model import build_random_model, model_args_from_hf

DENSE = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
)
MOE = dict(
    DENSE,
    model_type="qwen2_moe",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    norm_topk_prob=False,
)


def tiny_model(cfg: dict = MOE, *, seed: int = 0, **overrides):
    """moetune's model of ``cfg`` (with ``overrides``) with N(0, 0.1) weights (norms at 1), in training mode."""
    return build_random_model(model_args_from_hf(dict(cfg, **overrides), where="test"), seed=seed, std=0.1)
