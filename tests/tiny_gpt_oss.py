"""Tiny random gpt-oss checkpoints built with transformers itself (parity references)."""

import transformers

from tiny_hf import randomised

# 3 layers (sliding, full, sliding) with a window of 4 so a 12-token batch crosses it; 8 experts
# top-2; GQA; YaRN as released (truncate false); attention biases; sinks.
CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=4,
    max_position_embeddings=256,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=150000.0,
        factor=4.0,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=False,
        original_max_position_embeddings=64,
    ),
)


def make_hf(seed: int = 0, std: float = 0.08, **overrides):
    """transformers' GptOssForCausalLM, :func:`tiny_hf.randomised` with eager attention; biases and sinks
    large enough to matter, and expert weights large enough that the +-7 clamps cut some activations."""
    config = transformers.GptOssConfig(**{**CONFIG, **overrides})
    return randomised(transformers.GptOssForCausalLM, config, seed, std, attention="eager", init=_sinks_and_experts)


def _sinks_and_experts(name: str, p) -> bool:
    if name.endswith("sinks"):
        p.normal_(0.0, 1.0)
    elif "experts" in name and not name.endswith("bias"):
        p.normal_(0.0, 0.6)
    else:
        return False
    return True
