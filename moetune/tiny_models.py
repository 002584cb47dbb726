"""Tiny random models shaped like real MoE families, for CPU examples and tests.

Each tiny model keeps the structure of its family (for DeepSeek-V3: MLA with a compressed query,
a dense first layer, sigmoid routing with a correction bias over several expert groups, a shared
expert, YaRN) at a size a laptop trains in seconds. Weights are random: they show the workflow and
the LoRA targets, not a skill. The vocabulary is the byte tokenizer's, so the built-in demo data
trains on it with ``data.tokenizer: byte``.

Write one (model + the demo's ``upper:`` task as JSONL) from the shell::

    python -m moetune.tiny_models deepseek_v3 tiny-deepseek-v3

which creates ``tiny-deepseek-v3/base-model`` (a Hugging Face folder that transformers loads too)
and ``tiny-deepseek-v3/data/upper_{train,eval}.jsonl``; ``examples/deepseek_v3_lora.yaml`` trains
on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .demo_data import make_rows, write_jsonl
from .errors import MoetuneError
from .model import build_random_model
from .model.config import ModelArgs
from .model.families import model_args_from_hf
from .outputs import open_folder

BYTE_VOCAB = 272  # the byte tokenizer's 262 ids, rounded up to a multiple of 16

# The layer plan of the tiny models in DeepSeek-V3's style (DeepSeek-V2/V3, GLM-4.5): 3 layers, the
# first dense, hidden 64, dense FFN 128, expert hidden 32, 4 query heads.
V3_STYLE_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}
# Both tiny DeepSeeks' latent attention: kv_lora_rank 16 and decoupled RoPE dims. They differ in
# what the two releases differ in.
DEEPSEEK_SHAPE: dict[str, Any] = {
    **V3_STYLE_SHAPE,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}

# family -> config.json of the tiny model (transformers 5 key names)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 as released, scaled down: 16 experts in 4 groups (keep 2), top-4, one shared
    # expert, q_lora_rank set, YaRN. ~0.3M parameters.
    "deepseek_v3": {
        **DEEPSEEK_SHAPE,
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "q_lora_rank": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    # DeepSeek-V2-Lite scaled down: direct q_proj (no q_lora_rank), greedy softmax routing, 2 shared experts.
    "deepseek_v2": {
        **DEEPSEEK_SHAPE,
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "q_lora_rank": None,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "topk_method": "greedy",
        "n_shared_experts": 2,
        "routed_scaling_factor": 1.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}
# The demo's base: Qwen3-MoE-shaped, 2 layers, 8 experts top-2 (~0.6M parameters at hidden 96).
TINY_CONFIGS["qwen3_moe"] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 96,
    "intermediate_size": 192,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.001,
}
# The MixLoRA demo's dense base: Qwen3-shaped, 2 layers, hidden 96, FFN 192.
TINY_CONFIGS["qwen3"] = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}
# gpt-oss as released, scaled down: sliding (window 16) and full layers alternating, learned sinks,
# attention biases, YaRN (truncate false), 8 biased experts top-2 with the clamped activation.
TINY_CONFIGS["gpt_oss"] = {
    "model_type": "gpt_oss",
    "architectures": ["GptOssForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "attention_bias": True,
    "max_position_embeddings": 512,
    "router_aux_loss_coef": 0.001,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 128,
    },
}
# GLM-4.5 as released, scaled down: q/k biases and per-head q/k norm, partial RoPE 0.5, the first
# layer dense, 16 experts top-4 behind a sigmoid router with a correction bias, one shared expert.
TINY_CONFIGS["glm4_moe"] = {
    "model_type": "glm4_moe",
    "architectures": ["Glm4MoeForCausalLM"],
    **V3_STYLE_SHAPE,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "use_qk_norm": True,
    "attention_bias": True,
    "partial_rotary_factor": 0.5,
    "num_nextn_predict_layers": 0,
    "rope_theta": 10000.0,
}
# Qwen3.5-MoE (text model) as released, scaled down: three gated DeltaNet layers then one gated-attention
# layer, 8 experts top-2 plus the gated shared expert, zero-centred norms, rotary on a quarter of each head.
TINY_CONFIGS["qwen3_5_moe"] = {
    "model_type": "qwen3_5_moe_text",
    "architectures": ["Qwen3_5MoeForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "max_position_embeddings": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "router_aux_loss_coef": 0.001,
}
COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False}


def tiny_model_args(family: str, vocab_size: int = BYTE_VOCAB) -> ModelArgs:
    """The :class:`ModelArgs` of a tiny model of ``family`` (a key of :data:`TINY_CONFIGS`)."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny model for family '{family}' (available: {', '.join(TINY_CONFIGS)})")
    return model_args_from_hf({**COMMON, **TINY_CONFIGS[family], "vocab_size": vocab_size})


def tiny_moe_args(vocab_size: int = BYTE_VOCAB, hidden_size: int = 96) -> ModelArgs:
    """The demo's tiny Qwen3-MoE base at width ``hidden_size`` (experts and head dim scale with it)."""
    widths = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "moe_intermediate_size": hidden_size,
        "head_dim": hidden_size // 4,
    }
    return model_args_from_hf({**COMMON, **TINY_CONFIGS["qwen3_moe"], **widths, "vocab_size": vocab_size})


def make_tiny(family: str, out_dir: str | Path, *, seed: int = 0, train_rows: int = 512, eval_rows: int = 32) -> Path:
    """Write a tiny random ``family`` model to ``out_dir/base-model`` and the demo's ``upper:``
    task to ``out_dir/data/upper_train.jsonl`` / ``upper_eval.jsonl`` (and as preference pairs to
    ``upper_pairs_train.jsonl`` / ``upper_pairs_eval.jsonl``).

    Returns:
        The model folder.
    """
    folder = open_folder(
        out_dir, "tiny-model", key="out"
    )  # new, empty or an earlier tiny model's: never someone's files
    out = folder.path
    for name in ("base-model", "data"):
        folder.entry(name)
    model = build_random_model(tiny_model_args(family), seed=seed, std=0.05)
    model.save_pretrained(out / "base-model")
    write_jsonl(make_rows("upper", train_rows, seed + 1), out / "data" / "upper_train.jsonl")
    write_jsonl(make_rows("upper", eval_rows, seed + 2), out / "data" / "upper_eval.jsonl")
    write_jsonl(make_rows("upper_pairs", train_rows, seed + 1), out / "data" / "upper_pairs_train.jsonl")
    write_jsonl(make_rows("upper_pairs", eval_rows, seed + 2), out / "data" / "upper_pairs_eval.jsonl")
    return out / "base-model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moetune.tiny_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(TINY_CONFIGS))
    parser.add_argument("out", help="output folder (base-model/ and data/ are written inside)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    try:
        folder = make_tiny(ns.family, ns.out, seed=ns.seed)
    except MoetuneError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"wrote {folder} and {Path(ns.out) / 'data'}")


if __name__ == "__main__":
    main()
