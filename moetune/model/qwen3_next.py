"""Hybrid linear-attention MoE: Qwen3-Next (``qwen3_next``) and Qwen3.5 / Qwen3.6-MoE
(``qwen3_5_moe``, text model), as in transformers 5.17.

Three of every four decoder layers mix tokens with gated DeltaNet (:mod:`.linear_attention`,
module ``linear_attn``); the rest use full attention whose query projection also emits a
per-head output gate (``o_proj(attn * sigmoid(gate))``). Every norm is zero-centred
(``x_normed * (1 + w)``), rotary covers the first quarter of each head, and the MoE adds a shared
expert scaled by ``sigmoid(shared_expert_gate(x))`` (the shared MoE block handles it).

Qwen3.5 differs from Qwen3-Next only in its DeltaNet projections (``in_proj_qkv`` / ``in_proj_z``
/ ``in_proj_b`` / ``in_proj_a`` instead of the per-head-group interleaved ``in_proj_qkvz`` /
``in_proj_ba``), in having no dense layers, and in always renormalising its top-k weights. Its
text-only multimodal rotary (``mrope_section``) reduces to plain rotary when the three position
axes are equal, which they are for text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .attention import Attention, KVCache
from .build import ATTENTION_BUILDERS, NORM_BUILDERS, build_attention
from .config import LinearAttentionArgs, MoEArgs, ModelArgs
from .families import config_value, parse_llama, register_family
from .layers import RMSNorm, Rope, apply_rope, rms_normalize
from .linear_attention import GatedDeltaNet


class ZeroCenteredRMSNorm(RMSNorm):
    """RMSNorm with weight stored as an offset from 1: ``x_normed * (1 + w)``, in fp32, then cast."""

    neutral_weight = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


class GatedAttention(Attention):
    """Grouped-query attention whose ``q_proj`` emits, per head, the query then an output gate."""

    def forward(
        self, x: torch.Tensor, *, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x (B, T, D); mask: bool (B, 1, T, S) or None for plain causal -> (B, T, D)."""
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, -1, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, -1)))


# --- builders -------------------------------------------------------------------------------


def build_gated_attention(args: ModelArgs, layer: int) -> nn.Module:
    """Per-head q/k norms (zero-centred); ``q_proj`` emits each head's query and its output gate."""
    return build_attention(args, layer, kind=GatedAttention, norm=ZeroCenteredRMSNorm, q_per_head=2)


def build_gated_deltanet(args: ModelArgs, layer: int) -> nn.Module:
    lin, D = args.linear, args.hidden_size
    key_dim, value_dim = lin.num_key_heads * lin.key_head_dim, lin.num_value_heads * lin.value_head_dim
    if lin.projections == "fused":
        projections = dict(
            in_proj_qkvz=nn.Linear(D, 2 * key_dim + 2 * value_dim, bias=False),
            in_proj_ba=nn.Linear(D, 2 * lin.num_value_heads, bias=False),
        )
    else:
        projections = dict(
            in_proj_qkv=nn.Linear(D, 2 * key_dim + value_dim, bias=False),
            in_proj_z=nn.Linear(D, value_dim, bias=False),
            in_proj_b=nn.Linear(D, lin.num_value_heads, bias=False),
            in_proj_a=nn.Linear(D, lin.num_value_heads, bias=False),
        )
    return GatedDeltaNet(
        layer_idx=layer,
        num_key_heads=lin.num_key_heads,
        num_value_heads=lin.num_value_heads,
        key_head_dim=lin.key_head_dim,
        value_head_dim=lin.value_head_dim,
        conv_kernel=lin.conv_kernel,
        eps=args.rms_norm_eps,
        out_proj=nn.Linear(value_dim, D, bias=False),
        **projections,
    )


def build_hybrid_mixer(args: ModelArgs, layer: int) -> nn.Module:
    if args.is_linear_attention_layer(layer):
        return build_gated_deltanet(args, layer)
    return build_gated_attention(args, layer)


# --- config.json parsers --------------------------------------------------------------------


def _linear_layers(cfg: dict[str, Any], num_layers: int) -> list[bool]:
    types = cfg.get("layer_types")
    if not types:  # older configs give the period of full-attention layers instead
        every = cfg.get("full_attention_interval") or 4
        return [(i + 1) % every != 0 for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"linear_attention", "full_attention"}:
        raise _bad(cfg, "layer_types", f"{num_layers} entries, each 'linear_attention' or 'full_attention'")
    return [t == "linear_attention" for t in types]


def _bad(cfg: dict[str, Any], field: str, allowed: str) -> CheckpointError:
    return CheckpointError(
        f"config.json of a '{cfg.get('model_type')}' model: {field}={cfg.get(field)!r} is not supported ({allowed})"
    )


def _hybrid(cfg: dict[str, Any], *, projections: str, moe_layers: list[bool], norm_topk_prob: bool) -> ModelArgs:
    args = parse_llama(cfg)
    args.qk_norm = "head"
    if "partial_rotary_factor" not in (cfg.get("rope_parameters") or {}) and "partial_rotary_factor" not in cfg:
        args.rope.partial_rotary_factor = 0.25  # transformers' default for these families
    hk, hv = config_value(cfg, "linear_num_key_heads"), config_value(cfg, "linear_num_value_heads")
    if hv % hk:
        raise _bad(cfg, "linear_num_value_heads", f"a multiple of linear_num_key_heads={hk}")
    args.linear = LinearAttentionArgs(
        num_key_heads=hk,
        num_value_heads=hv,
        key_head_dim=config_value(cfg, "linear_key_head_dim"),
        value_head_dim=config_value(cfg, "linear_value_head_dim"),
        conv_kernel=config_value(cfg, "linear_conv_kernel_dim", default=4),
        layers=_linear_layers(cfg, args.num_layers),
        projections=projections,
    )
    args.moe = MoEArgs(
        num_experts=config_value(cfg, "num_experts"),
        top_k=config_value(cfg, "num_experts_per_tok"),
        intermediate_size=config_value(cfg, "moe_intermediate_size"),
        norm_topk_prob=norm_topk_prob,
        layers=moe_layers,
        shared_intermediate_size=config_value(cfg, "shared_expert_intermediate_size"),
        shared_expert_gate=True,
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
    )
    return args


def parse_qwen3_next(cfg: dict[str, Any]) -> ModelArgs:
    """Qwen3-Next: fused DeltaNet projections; dense FFN in ``mlp_only_layers`` / off the sparse step."""
    layers, experts = config_value(cfg, "num_hidden_layers"), config_value(cfg, "num_experts")
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
    moe_layers = [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers)]
    norm = bool(cfg.get("norm_topk_prob", True))
    return _hybrid(cfg, projections="fused", moe_layers=moe_layers, norm_topk_prob=norm)


def parse_qwen3_5_moe_text(cfg: dict[str, Any]) -> ModelArgs:
    """Qwen3.5 / Qwen3.6-MoE text model: split DeltaNet projections, every layer MoE."""
    layers = config_value(cfg, "num_hidden_layers")
    return _hybrid(cfg, projections="split", moe_layers=[True] * layers, norm_topk_prob=True)


def _register() -> None:
    for family, parser in (("qwen3_next", parse_qwen3_next), ("qwen3_5_moe_text", parse_qwen3_5_moe_text)):
        register_family(family, parser)
        ATTENTION_BUILDERS[family] = build_hybrid_mixer
        NORM_BUILDERS[family] = ZeroCenteredRMSNorm


_register()
