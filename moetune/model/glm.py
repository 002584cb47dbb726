"""GLM-4.5 / 4.6 / 4.7 (``glm4_moe``) and GLM-4.7-Flash (``glm4_moe_lite``): parsers and builders.

Both route like DeepSeek-V3 (transformers 5.17's ``Glm4MoeTopkRouter`` is ``DeepseekV3TopkRouter``):
sigmoid scores, a selection-only ``e_score_correction_bias``, group-limited top-k (``noaux_tc``),
optional renormalisation and ``routed_scaling_factor``; one shared expert beside the routed ones.
So the MoE blocks are :func:`~.deepseek.build_deepseek_moe` as they are.

``glm4_moe`` attention is grouped-query attention with biases on q/k/v only (never on ``o_proj``),
an optional per-head q/k RMSNorm (``use_qk_norm``) and rotate-half RoPE on the first half of each
head (``partial_rotary_factor`` 0.5 unless the config says otherwise): the shared
:class:`~.attention.Attention`. Its first ``first_k_dense_replace`` layers are dense.

``glm4_moe_lite`` is DeepSeek-V3's latent attention (:func:`~.deepseek.build_mla`) with GLM's
defaults; which layers are MoE comes from ``mlp_layer_types`` (default: all but the first), as in
transformers, which ignores ``first_k_dense_replace`` for this family.

Keys a config leaves out take the transformers 5.17 defaults of that family, as for DeepSeek.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .build import ATTENTION_BUILDERS, DENSE_BUILDERS, MOE_BUILDERS
from .config import ModelArgs
from .deepseek import build_deepseek_dense, build_deepseek_moe, build_mla
from .deepseek_config import mla_model_args, v3_moe_args, v3_rope_layout
from .families import parse_llama, parse_rope, register_family

# transformers 5.17's defaults of each family, for the keys a config.json leaves out
DEFAULTS: dict[str, dict[str, Any]] = {
    "glm4_moe": {
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
    },
    "glm4_moe_lite": {
        "q_lora_rank": 768,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.8,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "rope_interleave": True,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 202752,
    },
}


def parse_glm4_moe(cfg: dict[str, Any]) -> ModelArgs:
    """GLM-4.5 / 4.5-Air / 4.6 / 4.7: GQA with partial RoPE, DeepSeek-V3 routing, dense first layers."""
    args = parse_llama(cfg)
    args.o_bias = False  # attention_bias covers q/k/v only
    args.qk_norm = "head" if cfg.get("use_qk_norm") else None
    args.moe = v3_moe_args(cfg, args.num_layers)
    return args


def _lite_moe_layers(cfg: dict[str, Any], num_layers: int) -> list[bool]:
    kinds = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers - 1)
    if len(kinds) != num_layers or not set(kinds) <= {"dense", "sparse"}:
        raise CheckpointError(
            f"config.json of a 'glm4_moe_lite' model: mlp_layer_types={kinds!r} is not supported "
            f"({num_layers} entries, each 'dense' or 'sparse')"
        )
    return [k == "sparse" for k in kinds]


def parse_glm4_moe_lite(cfg: dict[str, Any]) -> ModelArgs:
    """GLM-4.7-Flash: multi-head latent attention (DeepSeek-V3's) and DeepSeek-V3 routing."""
    partial = parse_rope(cfg).partial_rotary_factor
    if partial != 1.0:  # the latent attention rotates exactly its qk_rope_head_dim dims
        raise CheckpointError(
            f"config.json of a 'glm4_moe_lite' model: partial_rotary_factor={partial} is not supported (1.0)"
        )
    args = mla_model_args(cfg, rope_layout=v3_rope_layout(cfg))
    args.moe = v3_moe_args(cfg, args.num_layers)
    if args.moe is not None:
        args.moe.layers = _lite_moe_layers(cfg, args.num_layers)
    return args


def _register() -> None:
    register_family("glm4_moe", parse_glm4_moe, defaults=DEFAULTS["glm4_moe"])
    MOE_BUILDERS["glm4_moe"] = build_deepseek_moe
    DENSE_BUILDERS["glm4_moe"] = build_deepseek_dense
    register_family("glm4_moe_lite", parse_glm4_moe_lite, defaults=DEFAULTS["glm4_moe_lite"])
    ATTENTION_BUILDERS["glm4_moe_lite"] = build_mla
    MOE_BUILDERS["glm4_moe_lite"] = build_deepseek_moe
    DENSE_BUILDERS["glm4_moe_lite"] = build_deepseek_dense


_register()
