"""DeepSeek multi-head latent attention (MLA), DeepSeek-V2 and -V3.

Legend: B batch, T query tokens, S key tokens (past + T), D model dim, H heads,
Cq query latent rank (``q_lora_rank``), C kv latent rank (``kv_lora_rank``),
Dn per-head dims without position (``qk_nope_head_dim``), Dr rotary dims (``qk_rope_head_dim``,
shared by all heads on the key side), Dqk = Dn + Dr, Dv value head dim (``v_head_dim``).

Data flow (names are transformers 5's in-memory module names, so LoRA targets and adapter keys
match PEFT's)::

    query:  x (B,T,D) -q_a_proj-> (B,T,Cq) -q_a_layernorm-> -q_b_proj-> (B,T,H*Dqk)
            or, when q_lora_rank is null (V2-Lite), x -q_proj-> (B,T,H*Dqk)
    kv:     x -kv_a_proj_with_mqa-> (B,T,C+Dr) = [latent c (B,T,C) | k_rot (B,T,Dr), one head]
            c -kv_a_layernorm-> -kv_b_proj-> (B,S,H*(Dn+Dv)) = per head [k_nope | v]
    keys:   [k_nope (B,H,S,Dn) | k_rot broadcast to H heads (B,H,S,Dr)]
    out:    sdpa -> (B,T,H*Dv) -o_proj-> (B,T,D)

The rope tables may carry a third tensor, a per-position query scale (B, T) (Mistral 4's
Llama-4 temperature, :class:`moetune.model.mistral4.QueryScaledRotary`); the query is multiplied
by it after rotation.

The KV cache holds the compressed latents (c after its norm, and the rotated k_rot), as
transformers does, and re-expands them through ``kv_b_proj`` each step; this keeps the cache
small and keeps a LoRA on ``kv_b_proj`` exact during decoding.

RoPE layouts of the Dr rotary dims (each must match the checkpoint's training):
  ``complex``    V2: consecutive pairs (x0,x1),(x2,x3).. rotated as complex numbers, output
                 keeps pairs interleaved (transformers' ``apply_rotary_emb``).
  ``interleave`` V3 with ``rope_interleave`` (its default): same pairs, output de-interleaved
                 into [rotated evens | rotated odds] (``apply_rotary_pos_emb_interleave``).
  ``half``       V3 with ``rope_interleave: false``: Llama's rotate-half.
``complex`` and ``interleave`` give the same q.k (the same permutation hits q and k); both are
kept so the rotated tensors match transformers element for element.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import KVCache, sdpa
from .config import RopeArgs
from .layers import Rope, apply_rope

ROPE_LAYOUTS = ("complex", "interleave", "half")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(rope: RopeArgs, qk_head_dim: int, max_position_embeddings: int) -> float:
    """Attention scale ``Dqk^-0.5``, times ``mscale(factor, mscale_all_dim)^2`` under scaled RoPE.

    DeepSeek folds YaRN's temperature into the softmax scale for all Dqk dims (``mscale_all_dim``)
    while the rotary tables carry only ``mscale / mscale_all_dim``; transformers applies it for
    any non-default rope type with a non-zero ``mscale_all_dim``, and so do we.
    """
    scale = qk_head_dim**-0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        factor = rope.factor
        if factor is None:  # same fallback as the YaRN tables
            factor = max_position_embeddings / (rope.original_max_position_embeddings or max_position_embeddings)
        m = yarn_mscale(factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def apply_rope_mla(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate ``x`` (B, h, T, Dr) with tables (B, T, Dr) in ``cat(freqs, freqs)`` form."""
    if layout == "half":
        return apply_rope(x, cos, sin)
    half = cos.shape[-1] // 2  # the first half holds one angle per pair
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    real, imag = even * cos - odd * sin, odd * cos + even * sin
    if layout == "interleave":
        return torch.cat((real, imag), dim=-1)
    return torch.stack((real, imag), dim=-1).flatten(-2)  # complex: pairs stay interleaved


class MultiHeadLatentAttention(nn.Module):
    """MLA with injected projections (``nn.Linear`` leaves LoRA can wrap) and a latent KV cache.

    Pass either ``q_proj`` (no query compression) or ``q_a_proj`` + ``q_a_layernorm`` +
    ``q_b_proj``. Absent projections are left unset (``None``), as in transformers, so module
    paths match one to one.
    """

    def __init__(
        self,
        *,
        layer_idx: int,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        softmax_scale: float,
        rope_layout: str,
        kv_a_proj_with_mqa: nn.Module,
        kv_a_layernorm: nn.Module,
        kv_b_proj: nn.Module,
        o_proj: nn.Module,
        q_proj: nn.Module | None = None,
        q_a_proj: nn.Module | None = None,
        q_a_layernorm: nn.Module | None = None,
        q_b_proj: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout '{rope_layout}' is not one of {ROPE_LAYOUTS}")
        if (q_proj is None) == (q_a_proj is None or q_b_proj is None or q_a_layernorm is None):
            raise ValueError("pass either q_proj, or all of q_a_proj, q_a_layernorm and q_b_proj")
        self.layer_idx = layer_idx
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale, self.rope_layout = softmax_scale, rope_layout
        self.q_proj, self.q_a_proj, self.q_a_layernorm, self.q_b_proj = q_proj, q_a_proj, q_a_layernorm, q_b_proj
        self.kv_a_proj_with_mqa, self.kv_a_layernorm, self.kv_b_proj = kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
        self.o_proj = o_proj

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,T,D) -> q_nope (B,H,T,Dn), q_rot (B,H,T,Dr) (not yet rotated)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.num_heads, self.qk_head_dim).transpose(1, 2)
        return q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def _latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,T,D) -> normed latent (B,1,T,C), k_rot (B,1,T,Dr) (not yet rotated)."""
        B, T, _ = x.shape
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        return latent.view(B, 1, T, self.kv_lora_rank), k_rot.view(B, 1, T, self.qk_rope_head_dim)

    def _expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B,1,S,C), rotated k_rot (B,1,S,Dr) -> keys (B,H,S,Dqk), values (B,H,S,Dv)."""
        B, _, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return k, v

    def forward(
        self, x: torch.Tensor, *, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x (B, T, D); rope: (cos, sin) (B, T, Dr) [+ query scale (B, T)]; mask: bool (B, 1, T, S) or
        None -> (B, T, D)."""
        B, T, _ = x.shape
        q_nope, q_rot = self._query(x)
        latent, k_rot = self._latent(x)
        cos, sin = rope[0], rope[1]
        q_rot = apply_rope_mla(q_rot, cos, sin, self.rope_layout)
        k_rot = apply_rope_mla(k_rot, cos, sin, self.rope_layout)
        if cache is not None:
            latent, k_rot = cache.update(self.layer_idx, latent, k_rot)
        k, v = self._expand(latent, k_rot)
        q = torch.cat((q_nope, q_rot), dim=-1)
        if len(rope) > 2:
            q = q * rope[2][:, None, :, None]
        out = sdpa(q, k, v, mask=mask, scale=self.softmax_scale)  # (B, H, T, Dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.v_head_dim))
