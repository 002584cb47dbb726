"""Tiny random Hugging Face models saved with transformers itself, for parity tests."""

from __future__ import annotations

import torch

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)

# name -> (config class name, model class name, config kwargs)
CASES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL)),
    "llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            SMALL,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama_yarn_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            SMALL,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, head_dim=24)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SMALL, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            SMALL,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(SMALL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "qwen3_moe_sparse_step": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            SMALL,
            num_hidden_layers=4,
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            head_dim=20,
        ),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(SMALL, num_experts=8, num_experts_per_tok=2, clip_qkv=3.0)),
}


def make_hf_model(name: str, seed: int = 0, std: float = 0.08):
    """Build the transformers model for a case with random weights (larger std than HF init
    so routing and attention are far from uniform and a wrong detail shows in the logits)."""
    import transformers

    cfg_cls, model_cls, kwargs = CASES[name]
    config = getattr(transformers, cfg_cls)(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def save_hf_model(name: str, folder, seed: int = 0):
    model = make_hf_model(name, seed)
    model.save_pretrained(folder)
    return model
