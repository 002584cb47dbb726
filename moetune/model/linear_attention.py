"""Gated DeltaNet token mixer (Qwen3-Next, Qwen3.5): projections, short convolution, gated
delta rule, gated RMSNorm, output projection.

Legend: B batch, T tokens, D model dim, Hk key heads, Hv value heads, Dk / Dv head dims,
Ch = 2*Hk*Dk + Hv*Dv conv channels (q, k, v side by side), K conv kernel.

Data flow (transformers 5.17 ``Qwen3NextGatedDeltaNet`` / ``Qwen3_5MoeGatedDeltaNet``)::

    x -in_proj_qkvz-> per key head [q Dk | k Dk | v (Hv/Hk)*Dv | z (Hv/Hk)*Dv]   (fused, Qwen3-Next)
    x -in_proj_ba->   per key head [b Hv/Hk | a Hv/Hk]
      or in_proj_qkv -> [q | k | v], in_proj_z, in_proj_b, in_proj_a             (split, Qwen3.5)
    [q|k|v] -causal conv (K taps)-> silu -> q, k (B,T,Hk,Dk) repeated to Hv heads, v (B,T,Hv,Dv)
    beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)
    o = gated delta rule(q, k, v, g, beta)   (chunked in training, recurrent when decoding)
    out_proj(RMSNorm(o) * silu(z))

Which tokens start a new sequence is read from the same attention mask the full-attention layers
get: a token that may not attend to its predecessor (padding, a packed document's first token)
starts afresh, so the recurrence and the convolution never carry state across a boundary. The
KV cache holds the conv inputs and the recurrent state per layer (``KVCache.recurrent``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache
from .delta_rule import DeltaRuleInputs, causal_conv, chunk_gated_delta_rule, recurrent_gated_delta_rule
from .delta_rule_fast import fast_chunk_rule
from .layers import RMSNorm, Rope, contiguous_grad


class GatedRMSNorm(RMSNorm):
    """RMSNorm over the head dim, then times ``silu(gate)`` (transformers' ``RMSNormGated``)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = x.dtype
        h = super().forward(x)
        return (h * F.silu(gate.float())).to(dtype)


def sequence_starts(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) True where a token may not attend to the token before it, or None when all may.

    Args:
        mask: bool (B, 1, T, past+T) attention mask (True = attend), or None for plain causal.
    """
    if mask is None:
        return None
    q_len, past = mask.shape[2], mask.shape[3] - mask.shape[2]
    rows = torch.arange(q_len, device=mask.device)
    prev = (rows + past - 1).clamp_min(0)
    sees = mask[:, 0, rows, prev]
    if past == 0:
        sees = sees & (rows > 0)
    return ~sees


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet with injected projections (``nn.Linear`` leaves LoRA can wrap).

    Pass ``in_proj_qkvz`` and ``in_proj_ba`` (fused, Qwen3-Next) or ``in_proj_qkv``, ``in_proj_z``,
    ``in_proj_b`` and ``in_proj_a`` (split, Qwen3.5); absent ones stay unset so module paths match
    transformers one to one.
    """

    def __init__(
        self,
        *,
        layer_idx: int,
        num_key_heads: int,
        num_value_heads: int,
        key_head_dim: int,
        value_head_dim: int,
        conv_kernel: int,
        eps: float,
        out_proj: nn.Module,
        **projections: nn.Module,
    ) -> None:
        super().__init__()
        fused, split = {"in_proj_qkvz", "in_proj_ba"}, {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"}
        if set(projections) not in (fused, split):
            raise ValueError(f"pass the projections {sorted(fused)} or {sorted(split)}, got {sorted(projections)}")
        self.layer_idx = layer_idx
        self.hk, self.hv, self.dk, self.dv = num_key_heads, num_value_heads, key_head_dim, value_head_dim
        self.fused = set(projections) == fused
        for name, module in projections.items():
            setattr(self, name, module)
        channels = 2 * self.hk * self.dk + self.hv * self.dv
        # Held for its weight (Ch, 1, K) under transformers' name; the convolution itself is causal_conv.
        self.conv1d = nn.Conv1d(channels, channels, conv_kernel, groups=channels, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, eps=eps)
        self.out_proj = out_proj

    def _project(self, x: torch.Tensor):
        """x (B,T,D) -> qkv (B,T,Ch), z (B,T,Hv,Dv), b and a (B,T,Hv)."""
        B, T, _ = x.shape
        if not self.fused:
            qkv, z = self.in_proj_qkv(x), self.in_proj_z(x).view(B, T, self.hv, self.dv)
            return qkv, z, self.in_proj_b(x), self.in_proj_a(x)
        r = self.hv // self.hk
        qkvz = self.in_proj_qkvz(x).view(B, T, self.hk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, self.hk, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(B, T, self.hv, self.dv), b.reshape(B, T, self.hv), a.reshape(B, T, self.hv)

    def _mix(self, qkv, b, a, *, resets, state):
        """Conv, activation and gated delta rule -> core output (B,T,Hv,Dv) and the new state."""
        B, T, _ = qkv.shape
        conv_state, recurrent_state = state if state is not None else (None, None)
        qkv, conv_state = causal_conv(qkv, self.conv1d.weight[:, 0], resets=resets, state=conv_state)
        q, k, v = F.silu(qkv).split([self.hk * self.dk, self.hk * self.dk, self.hv * self.dv], dim=-1)
        q, k, v = q.view(B, T, self.hk, self.dk), k.view(B, T, self.hk, self.dk), v.view(B, T, self.hv, self.dv)
        if self.hv > self.hk:
            q, k = q.repeat_interleave(self.hv // self.hk, dim=2), k.repeat_interleave(self.hv // self.hk, dim=2)
        beta = b.sigmoid()
        # softplus's eager backward lays its result out like the incoming gradient (transposed here,
        # by the delta rule's heads-first copy), its meta kernel like the input: a compiled backward
        # then views it with the wrong strides. A contiguous gradient makes both agree.
        g = -self.A_log.float().exp() * contiguous_grad(F.softplus(a.float() + self.dt_bias))
        if state is not None and T == 1:
            rule = recurrent_gated_delta_rule
        else:  # flash-linear-attention's kernel on CUDA where installed, else the PyTorch reference
            rule = fast_chunk_rule(qkv.device) or chunk_gated_delta_rule
        out, recurrent_state = rule(DeltaRuleInputs(q, k, v, g, beta, resets, recurrent_state))
        return out, (conv_state, recurrent_state)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: Rope,  # noqa: ARG002 - every token mixer takes the rotary tables; DeltaNet has no positions
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, D); mask: bool (B, 1, T, S) attention mask or None -> (B, T, D)."""
        B, T, _ = x.shape
        state = cache.recurrent.get(self.layer_idx) if cache is not None else None
        resets = sequence_starts(mask)
        qkv, z, b, a = self._project(x)
        out, new_state = self._mix(qkv, b, a, resets=resets, state=state)
        if cache is not None:
            cache.recurrent[self.layer_idx] = new_state
        out = self.norm(out, z)
        return self.out_proj(out.reshape(B, T, self.hv * self.dv))
