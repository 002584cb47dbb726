"""Grouped-query attention on ``F.scaled_dot_product_attention``, with an optional KV cache.

Shapes: B batch, T query tokens, S key tokens, D model dim, H query heads, K kv heads, Dh head dim.
The projections are injected (``q_proj`` ... ``o_proj``), so LoRA replaces leaves and never
subclasses attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, Rope, apply_rope


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding.

    Recurrent layers (gated DeltaNet) keep their fixed-size state in ``recurrent`` instead: it
    summarises all earlier positions and is replaced, not extended, at each step.

    A sliding-window layer (``windows``, set by the model) keeps only its last ``window - 1``
    positions, all the next query can see, as transformers' sliding-window cache does; a step
    still attends over what was kept plus its own new keys.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recurrent: dict[int, tuple[torch.Tensor, ...]] = {}
        self.windows: dict[int, int] = {}  # layer -> sliding window
        self.seen: dict[int, int] = {}  # layer -> positions cached so far (kept or not)

    @property
    def length(self) -> int:
        """Positions seen so far (what the next step's positions start from)."""
        return max(self.seen.values(), default=0)

    def kept(self, window: int | None, past: int) -> int:
        """How many of ``past`` positions a layer with ``window`` holds (the keys before a step's own)."""
        return past if window is None else min(past, window - 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, Dh); returns this step's keys and values (kept ones + new)."""
        self.seen[layer] = self.seen.get(layer, 0) + k.shape[2]
        if layer in self.layers:
            old_k, old_v = self.layers[layer]
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        keep = self.kept(self.windows.get(layer), k.shape[2])
        if keep < k.shape[2]:  # own storage, so the step's full keys are freed
            self.layers[layer] = (k[:, :, k.shape[2] - keep :].clone(), v[:, :, v.shape[2] - keep :].clone())
        else:
            self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    """Multi-head attention with GQA, RoPE, optional q/k RMSNorm (per head or full width)."""

    def __init__(
        self,
        *,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        qk_norm: str | None = None,
        clip_qkv: float | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.qk_norm = qk_norm
        self.clip_qkv = clip_qkv

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        B, T, _ = x.shape
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        if self.qk_norm == "head":  # Qwen3 normalises each head
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(B, T, -1, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self, x: torch.Tensor, *, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x (B, T, D); mask: bool (B, 1, T, S) True = attend, or None for plain causal."""
        q, k, v = self._project(x)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v, mask)
        B, T = x.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, T, Dh), k/v (B, K, S, Dh) -> (B, H, T, Dh); variants (attention sinks) override it."""
        return sdpa(q, k, v, mask=mask, scale=self.head_dim**-0.5)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA with GQA; causal when ``mask`` is None (only valid when T == S)."""
    gqa = q.shape[1] != k.shape[1]
    # a branch, not is_causal=(T > 1): a compiled caller sees T as a symbol, which is_causal refuses
    if mask is None and q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def build_mask(
    *,
    batch: int,
    q_len: int,
    past: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor | None:
    """Bool mask (B, 1, T, S), or None when plain causal attention is exact.

    Keys are visible when causal, not padding, in the same packed segment and inside the sliding
    window. Each query may always see itself, so rows of padding queries never become all-masked
    (SDPA would return NaN there, and NaN poisons gradients even where the loss ignores it).
    """
    if attention_mask is None and segment_ids is None and window is None and past == 0:
        return None
    s_len = past + q_len
    qi = torch.arange(past, s_len, device=device)[:, None]
    kj = torch.arange(s_len, device=device)[None, :]
    allowed = (kj <= qi)[None]
    if window is not None:
        allowed = allowed & (qi - kj < window)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, -s_len:].bool()
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    allowed = allowed | (qi == kj)[None]
    return allowed.expand(batch, q_len, s_len).unsqueeze(1)
