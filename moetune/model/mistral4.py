"""Mistral 4 (``mistral4``, Mistral-Small-4): parser and builders.

DeepSeek-V3's shape with Mistral's choices (transformers 5.17 ``modeling_mistral4``):
- latent attention (:func:`~.deepseek.build_mla`) whose query is multiplied by Llama 4's
  position-dependent temperature ``1 + beta * log(1 + floor(pos / original_max_position_embeddings))``
  (``rope_parameters.llama_4_scaling_beta``); :class:`QueryScaledRotary` hands that factor to the
  attention as a third element of the rope tables;
- a softmax router with DeepSeek-V3's group rule (group score = sum of its best two experts), no
  correction bias, optional renormalisation and ``routed_scaling_factor``: a
  :class:`~.deepseek.DeepSeekRouter` with ``scoring="softmax"`` and ``topk_method="noaux_tc"``;
- one shared expert, the first ``first_k_dense_replace`` layers dense (default 0).
Checkpoints store the experts fused (``mlp.experts.gate_up_proj``), and so do we when saving.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .build import ATTENTION_BUILDERS, DENSE_BUILDERS, MOE_BUILDERS, ROTARY_BUILDERS
from .config import ModelArgs
from .deepseek import build_deepseek_dense, build_deepseek_moe, build_mla
from .deepseek_config import mla_model_args, v3_moe_args, v3_rope_layout
from .families import register_family
from .layers import RotaryEmbedding

# transformers 5.17's defaults, for the keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "first_k_dense_replace": 0,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": 1024,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "rope_interleave": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1048576,
}
# transformers' rope_parameters when a config has none
DEFAULT_ROPE: dict[str, Any] = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 128.0,
    "original_max_position_embeddings": 8192,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale_all_dim": 1.0,
    "mscale": 1.0,
    "llama_4_scaling_beta": 0.1,
}


class QueryScaledRotary(RotaryEmbedding):
    """Rope tables plus Llama 4's per-position query temperature: (cos, sin, scale (B, T))."""

    def __init__(self, *, beta: float, original_max: int, **rotary) -> None:
        super().__init__(**rotary)
        self.beta, self.original_max = beta, original_max

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        cos, sin = super().forward(position_ids, dtype)
        scale = 1 + self.beta * torch.log(1 + torch.floor(position_ids.float() / self.original_max))
        return cos, sin, scale.to(dtype)


def parse_mistral4(cfg: dict[str, Any]) -> ModelArgs:
    """Mistral 4: MLA with a position-dependent query temperature, softmax group-limited routing."""
    args = mla_model_args(cfg, rope_layout=v3_rope_layout(cfg))
    if args.rope.llama_4_scaling_beta is None or not args.rope.original_max_position_embeddings:
        given = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        raise CheckpointError(
            "config.json of a 'mistral4' model: rope_parameters needs llama_4_scaling_beta and "
            f"original_max_position_embeddings (the query temperature), got {given!r}"
        )
    args.moe = v3_moe_args(cfg, args.num_layers, scoring="softmax")
    return args


def build_rotary(args: ModelArgs) -> nn.Module:
    return QueryScaledRotary(
        beta=args.rope.llama_4_scaling_beta,
        original_max=args.rope.original_max_position_embeddings,
        rope=args.rope,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
    )


register_family("mistral4", parse_mistral4, defaults=DEFAULTS, rope=DEFAULT_ROPE)
ATTENTION_BUILDERS["mistral4"] = build_mla
MOE_BUILDERS["mistral4"] = build_deepseek_moe
DENSE_BUILDERS["mistral4"] = build_deepseek_dense
ROTARY_BUILDERS["mistral4"] = build_rotary
