"""gpt-oss (gpt-oss-20b / -120b): attention sinks, biased clamped-SwiGLU experts, top-k-then-softmax router.

Legend: B batch, T query tokens, S key tokens, H query heads, K kv heads, Dh head dim, N tokens,
R routed rows (sorted by expert), D model dim, F expert hidden, E experts, k experts per token.

What differs from the shared parts (transformers 5.17 ``modeling_gpt_oss.py`` is the reference):
- attention: every layer has a learned logit per head (``sinks``, (H,)) that takes part in the
  softmax as one more key with a zero value, so a query can attend to "nothing"; sliding-window
  (``layer_types``) and full layers alternate; q/k/v/o carry biases; YaRN RoPE.
- experts: ``gate_up_proj`` and ``down_proj`` carry per-expert biases; the activation is
  ``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)`` with ``g = clamp(gate, max=7)``.
- router: ``Linear(D, E)`` with bias, top-k on the logits, softmax over the k chosen logits.

In memory the experts keep the shared layout (``(E, out, in)``, gate rows before up rows); the
checkpoint's transposed, interleaved tensors are converted by the key map (``hf.LAYOUT_RULES``),
so the LoRA wrappers, files and quantized stores see the same layout as every family (the MXFP4
release's interleaved rows of blocks are permuted to gate-first whole, see ``quant/mxfp4.py``; the
stored weights plug in through ``GroupedExperts.linear``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .attention import Attention, sdpa
from .build import ATTENTION_BUILDERS, MOE_BUILDERS, build_attention
from .config import MoEArgs, ModelArgs
from .families import config_value, parse_llama, register_family
from .dispatch import row_experts
from .moe import GroupedExperts, MoEBlock, Router, Routing

# transformers 5.17 GptOssConfig defaults, for keys a config.json leaves out.
DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 36,
    "num_local_experts": 128,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "num_experts_per_tok": 4,
    "router_aux_loss_coef": 0.001,
    "attention_bias": True,
    "rope_theta": 150000.0,
}
# its rope_parameters when a config has none (rope_theta: the config's own)
DEFAULT_ROPE: dict[str, Any] = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
SWIGLU_LIMIT, SWIGLU_ALPHA = 7.0, 1.702  # transformers hard-codes both
LAYER_TYPES = ("sliding_attention", "full_attention")
SINK_PAD = 8  # the sink's extra q/k coordinates: keeps the head dim a multiple of 8 for fused SDPA kernels


def _bad(field: str, value: Any, allowed: str) -> CheckpointError:
    return CheckpointError(f"config.json of a 'gpt_oss' model: {field}={value!r} is not supported ({allowed})")


def _layer_types(cfg: dict[str, Any], num_layers: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:  # transformers' default: sliding on even layers, full on odd ones
        return [LAYER_TYPES[i % 2] for i in range(num_layers)]
    if len(types) != num_layers or not set(types) <= set(LAYER_TYPES):
        raise _bad("layer_types", types, f"{num_layers} entries, each one of {', '.join(LAYER_TYPES)}")
    return list(types)


def parse_gpt_oss(cfg: dict[str, Any]) -> ModelArgs:
    """``config.json`` of ``model_type: gpt_oss`` -> :class:`ModelArgs` (missing keys: transformers' defaults)."""
    limit = cfg.get("swiglu_limit", SWIGLU_LIMIT)
    if limit != SWIGLU_LIMIT:  # transformers ignores the key and clamps at 7: refuse rather than differ
        raise _bad("swiglu_limit", limit, f"{SWIGLU_LIMIT}, the limit transformers' gpt-oss applies")
    layers = config_value(cfg, "num_hidden_layers")
    cfg["layer_types"] = _layer_types(cfg, layers)
    args = parse_llama(cfg)  # sliding_window per layer from layer_types; attention_bias on q/k/v and o
    experts = config_value(cfg, "num_local_experts", "num_experts")
    args.moe = MoEArgs(
        num_experts=experts,
        top_k=config_value(cfg, "num_experts_per_tok"),
        intermediate_size=config_value(cfg, "intermediate_size"),
        norm_topk_prob=True,  # softmax over the k chosen logits: the k weights sum to 1
        layers=[True] * layers,
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
    )
    return args


# --- modules --------------------------------------------------------------------------------


def sink_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention where each head's softmax also covers a learned logit ``sinks[h]`` with a zero value.

    The sink is one more key: q gains a coordinate holding ``sinks[h] / scale`` and the sink key is
    the unit vector on it (zero value), so SDPA's own kernels compute exactly
    ``softmax([q k^T * scale, sink])[:, :-1] @ v`` with a boolean mask shared by all heads (a
    per-head additive mask would cost B*H*T*S elements).

    Args:
        q: (B, H, T, Dh); k, v: (B, K, S, Dh); sinks: (H,).
        mask: bool (B or 1, 1, T, S), True = attend, or None for plain causal attention.
    """
    B, H, T, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    sink_q = (sinks.to(q.dtype) / scale).view(1, H, 1, 1).expand(B, H, T, 1)
    q = torch.cat((q, sink_q, q.new_zeros(B, H, T, SINK_PAD - 1)), dim=-1)
    sink_k = k.new_zeros(B, K, 1, Dh + SINK_PAD)
    sink_k[..., Dh] = 1.0
    k = torch.cat((F.pad(k, (0, SINK_PAD)), sink_k), dim=2)
    v = torch.cat((v, v.new_zeros(B, K, 1, v.shape[-1])), dim=2)
    mask = torch.cat((mask, mask.new_ones(*mask.shape[:-1], 1)), dim=-1)
    return sdpa(q, k, v, mask=mask, scale=scale)


class SinkAttention(Attention):
    """:class:`Attention` with gpt-oss's learned per-head sinks (``sinks`` (H,), transformers' name)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return sink_sdpa(q, k, v, self.sinks, mask=mask, scale=self.head_dim**-0.5)


class GptOssRouter(Router):
    """``Linear(D, E)`` with bias; top-k on the logits, softmax over the k chosen ones.

    ``Routing.probs`` is the softmax over all E logits (what transformers' aux loss uses).
    """

    def __init__(self, *, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))  # (E, D)
        self.bias = nn.Parameter(torch.empty(num_experts))  # (E,)
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, D) -> weights (N, k) in x's dtype, experts (N, k), probs (N, E) fp32."""
        logits = F.linear(x, self.weight, self.bias)
        top, experts = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        return Routing(weights=weights.to(x.dtype), experts=experts, probs=torch.softmax(logits.float(), dim=-1))


class GptOssExperts(GroupedExperts):
    """Grouped experts with biases and gpt-oss's clamped gated activation.

    Parameters: ``gate_up_proj`` (E, 2F, D) gate rows first, ``gate_up_proj_bias`` (E, 2F) in the
    same order, ``down_proj`` (E, D, F), ``down_proj_bias`` (E, D).
    """

    gate_up_interleaved = True

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden: int,
        limit: float = SWIGLU_LIMIT,
        alpha: float = SWIGLU_ALPHA,
        use_loop: bool = False,
    ) -> None:
        super().__init__(num_experts=num_experts, dim=dim, hidden=hidden, use_loop=use_loop)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * hidden))  # (E, 2F)
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, dim))  # (E, D)
        self.limit, self.alpha = limit, alpha
        self.act_name = "gpt_oss"

    places_rows = False  # the biases are indexed by row: a layout's rows past the last expert have none

    def project_gate_up(self, x: torch.Tensor, offsets: torch.Tensor, placed: bool = False) -> torch.Tensor:
        bias = self.gate_up_proj_bias[row_experts(offsets, x.shape[0])]
        return super().project_gate_up(x, offsets, placed) + bias.to(x.dtype)

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)  # gate: upper clamp only
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def project_down(self, h: torch.Tensor, offsets: torch.Tensor, placed: bool = False) -> torch.Tensor:
        bias = self.down_proj_bias[row_experts(offsets, h.shape[0])]
        return super().project_down(h, offsets, placed) + bias.to(h.dtype)


# --- builders -------------------------------------------------------------------------------


def build_gpt_oss_attention(args: ModelArgs, layer: int) -> nn.Module:
    return build_attention(args, layer, kind=SinkAttention)


def build_gpt_oss_moe(args: ModelArgs, layer: int) -> nn.Module:  # noqa: ARG001 - the part builder signature
    moe, D = args.moe, args.hidden_size
    return MoEBlock(
        gate=GptOssRouter(dim=D, num_experts=moe.num_experts, top_k=moe.top_k),
        experts=GptOssExperts(num_experts=moe.num_experts, dim=D, hidden=moe.intermediate_size),
        router_name="router",
    )


def _register() -> None:
    register_family("gpt_oss", parse_gpt_oss, defaults=DEFAULTS, rope=DEFAULT_ROPE)
    ATTENTION_BUILDERS["gpt_oss"] = build_gpt_oss_attention
    MOE_BUILDERS["gpt_oss"] = build_gpt_oss_moe


_register()
