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


def randomised(model_cls, config, seed: int = 0, std: float = 0.08, *, attention: str = "sdpa", init=None):
    """transformers' ``model_cls(config)`` with weights far from its own init, so that routing and
    attention are far from uniform and a wrong detail shows in the logits: N(0, std), norms
    1 + N(0, 0.1), router correction biases N(0, 0.1) (sigmoid scores sit near 0.5 +- 0.1, so they
    reorder the choice); ``init(name, p)`` sets a parameter its own way when it returns True."""
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if init is not None and init(name, p):
                continue
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model.eval()


def make_hf_model(name: str, seed: int = 0, std: float = 0.08):
    """The transformers model of a case, :func:`randomised`."""
    import transformers

    cfg_cls, model_cls, kwargs = CASES[name]
    return randomised(getattr(transformers, model_cls), getattr(transformers, cfg_cls)(**kwargs), seed, std)


def save_hf_model(name: str, folder, seed: int = 0):
    model = make_hf_model(name, seed)
    model.save_pretrained(folder)
    return model


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (3, 12) and an attention mask that pads row 1 on the left (4) and row 2 on the right (3)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask
