"""The gated delta rule (gated DeltaNet's recurrence) and its short causal convolution, in PyTorch.

Legend: B batch, T tokens, H heads (value heads; keys are repeated to H first), Dk key head dim,
Dv value head dim, C chunk length, N chunks, K convolution kernel, Ch conv channels.

Per head, with a state S (Dk, Dv), for each token t (q, k L2-normalised, q scaled by Dk^-0.5)::

    S = exp(g_t) * S                       decay (g_t <= 0)
    S = S + k_t (beta_t * (v_t - S^T k_t))^T   delta-rule write of what S mispredicts
    o_t = S^T q_t

:func:`recurrent_gated_delta_rule` runs that loop (generation, and the reference in tests);
:func:`chunk_gated_delta_rule` computes the same outputs chunk by chunk with a triangular solve
inside each chunk and a scan over chunks, which is what training uses. Both are plain autograd,
so the chunked backward is exact. Numerics follow transformers 5.17's torch fallbacks
(``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``): fp32 throughout.

``resets`` (B, T) bool marks tokens that start a new sequence: the state from earlier tokens is
dropped before them. Packed rows (several documents in one row) and padding use it, so no
state crosses a document boundary; the convolution restarts at the same places.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (the flash-linear-attention convention)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class DeltaRuleInputs(NamedTuple):
    """The inputs of one gated-delta-rule call, whichever form runs it.

    q, k: (B, T, H, Dk) raw queries and keys (each form L2-normalises them).
    v: (B, T, H, Dv).
    g: (B, T, H) log decay (<= 0).
    beta: (B, T, H) write strength in (0, 1).
    resets: (B, T) bool, True where the state is dropped before the token, or None.
    initial_state: (B, H, Dk, Dv) state before the first token, or None for zeros.

    Every form returns the output (B, T, H, Dv) in q's dtype and the final state (B, H, Dk, Dv) fp32.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    resets: torch.Tensor | None = None
    initial_state: torch.Tensor | None = None


def _heads_first(x: DeltaRuleInputs) -> tuple[torch.Tensor, ...]:
    """q, k (L2-normalised, not yet scaled), v, beta, g as (B, H, T, ...) fp32 contiguous."""
    q, k, v, beta, g = (
        t.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for t in (x.q, x.k, x.v, x.beta, x.g)
    )
    return l2norm(q), l2norm(k), v, beta, g


def _initial_state(x: DeltaRuleInputs, like: torch.Tensor) -> torch.Tensor:
    """The state before the first token: the given one in fp32, or zeros (B, H, Dk, Dv)."""
    if x.initial_state is not None:
        return x.initial_state.to(like)
    B, _, H, Dk = x.k.shape
    return like.new_zeros(B, H, Dk, x.v.shape[-1])


def recurrent_gated_delta_rule(x: DeltaRuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule (generation, and the reference in tests)."""
    q, k, v, beta, g = _heads_first(x)
    q = q / (q.shape[-1] ** 0.5)  # transformers' recurrent form divides, its chunked form multiplies
    B, H, T, Dk = k.shape
    state = _initial_state(x, q)
    keep = None if x.resets is None else (~x.resets).to(q.dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    outs = []
    for t in range(T):
        if keep is not None:
            state = state * keep[:, :, t]
        state = state * g[:, :, t].exp()[..., None, None]
        predicted = (state * k[:, :, t, :, None]).sum(dim=-2)
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(dim=-2))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return out.transpose(1, 2).contiguous().to(x.q.dtype), state


def _chunk_decays(g: torch.Tensor, resets: torch.Tensor | None):
    """From log decays g (B,H,N,C) and resets (B, N*C): the in-chunk pairwise decays (B,H,N,C,C),
    zero above the diagonal; the decay from the chunk start to each position (B,H,N,C), from
    each position to the chunk end (B,H,N,C), and across the whole chunk (B,H,N).

    With resets, pairs in different sequences and carried state past a boundary decay to zero.
    """
    B, _, N, C = g.shape
    upper = torch.ones(C, C, dtype=torch.bool, device=g.device).triu(1)
    if resets is None:
        cum = g.cumsum(-1)
    else:
        seg = resets.view(B, 1, N, C).long().cumsum(-1)  # sequence index inside each chunk
        same = seg[..., :, None] == seg[..., None, :]
        # The log decay restarts with each sequence, summed over that sequence only: a running
        # sum through earlier sequences would reach hundreds and cost its digits in differences.
        cum = ((same & ~upper).to(g.dtype) @ g[..., None]).squeeze(-1)
    pair = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf"))
    to_end = cum[..., -1:] - cum
    if resets is not None:
        # Masked before exp, never after: across a boundary these differences may be large and
        # positive, and exp(inf) * 0 would be NaN.
        pair = pair.masked_fill(~same, float("-inf"))
        cum = cum.masked_fill(seg != 0, float("-inf"))
        to_end = to_end.masked_fill(seg != seg[..., -1:], float("-inf"))
    return pair.exp(), cum.exp(), to_end.exp(), cum[..., -1].exp()


def chunk_gated_delta_rule(x: DeltaRuleInputs, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule; same arguments and results as :func:`recurrent_gated_delta_rule`.

    Inside a chunk the C delta-rule writes are condensed by one unit-lower-triangular solve (the
    UT transform); the state then crosses chunk boundaries in a scan of N steps.
    """
    q, k, v, beta, g = _heads_first(x)
    q = q * q.shape[-1] ** -0.5
    B, H, T, Dk = k.shape
    Dv, C = v.shape[-1], chunk_size
    pad = (C - T % C) % C
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    N = (T + pad) // C
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(B, H, N, C, -1) for x in (q, k, k_beta, v_beta))
    pair, decay_in, decay_out, carry = _chunk_decays(
        g.reshape(B, H, N, C), None if x.resets is None else F.pad(x.resets, (0, pad))
    )
    ut = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    # one solve for both right-hand sides: batched small triangular solves dominate on CPU
    rhs = torch.cat((v_beta, k_beta * decay_in[..., None]), dim=-1)
    new_v, k_cumdecay = torch.linalg.solve_triangular(ut, rhs, upper=False, unitriangular=True).split([Dv, Dk], -1)
    q, k = q * decay_in[..., None], k * decay_out[..., None]
    state = _initial_state(x, q)
    outs = []
    for i in range(N):
        v_new = new_v[:, :, i] - k_cumdecay[:, :, i] @ state
        outs.append(q[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * carry[:, :, i, None, None] + k[:, :, i].transpose(-1, -2) @ v_new
    out = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return out.transpose(1, 2).contiguous().to(x.q.dtype), state


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    resets: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution (no bias, no activation) that restarts at ``resets``.

    Args:
        x: (B, T, Ch) inputs.
        weight: (Ch, K) per-channel taps, oldest first (``nn.Conv1d`` weight[:, 0]).
        resets: (B, T) bool, True where a new sequence starts (earlier inputs are not seen).
        state: (B, K-1, Ch) the inputs before x (zeros where they belong to an earlier sequence),
            or None for zeros.

    Returns:
        (B, T, Ch) outputs in x's dtype, and the next state (B, K-1, Ch): the last K-1 inputs,
        zeroed where they are not in the last token's sequence.
    """
    B, T, Ch = x.shape
    K = weight.shape[1]
    past = x.new_zeros(B, K - 1, Ch) if state is None else state.to(x.dtype)
    xs = torch.cat((past, x), dim=1)  # (B, K-1+T, Ch)
    wide, w = xs.float(), weight.float()  # summed in fp32, as a convolution kernel accumulates
    if resets is None:
        out = sum(wide[:, i : i + T] * w[:, i] for i in range(K))
        return out.to(x.dtype), xs[:, T:]
    seg = F.pad(resets.long().cumsum(1), (K - 1, 0))  # (B, K-1+T): sequence index of every input
    here = seg[:, K - 1 :]
    out = sum(wide[:, i : i + T] * w[:, i] * (seg[:, i : i + T] == here)[..., None] for i in range(K))
    return out.to(x.dtype), xs[:, T:] * (seg[:, T:] == seg[:, -1:])[..., None]
