"""DoRA on LoRA experts (MixDoRA): the per-expert magnitude and the factor that rescales outputs.

Legend: E experts, in/out the projection's features, r expert rank, s expert scaling, R routed rows.

DoRA experts follow PEFT's DoRA per expert and projection: a trained magnitude ``m_e`` (E, out) and
``W_e' = m_e * (W + s B_e A_e) / ||W + s B_e A_e||`` (row norms, detached, as PEFT), computed from
r x r Gram matrices so ``B_e A_e`` is never formed.
"""

from __future__ import annotations

import torch
from torch import nn


def initial_magnitude(weight: torch.Tensor, num_experts: int) -> nn.Parameter:
    """(E, out) ``||W||`` per row for every expert: each expert starts equal to the frozen layer."""
    norm = torch.linalg.norm(weight.float(), dim=1)
    return nn.Parameter(norm.expand(num_experts, -1).clone())


def dora_factor(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scaling: float
) -> torch.Tensor:
    """(E, out) ``m_e / ||W + s B_e A_e||`` with the norm detached, from Gram matrices:
    ``||W_j + s b_j A||^2 = ||W_j||^2 + 2 s b_j (A W_j^T) + s^2 b_j (A A^T) b_j^T``.

    Args:
        weight: the frozen (out, in) weight.
        a, b: the experts' (E, r, in) and (E, out, r) pairs.
        magnitude: the experts' (E, out) trained magnitudes (gradients flow to it only).
        scaling: ``s``.
    """
    s = scaling
    a, b = a.detach(), b.detach()
    with torch.no_grad():
        w = weight.float()  # (out, in)
        wa = torch.einsum("oi,eri->eor", w, a)  # (E, out, r)
        gram = torch.bmm(a, a.transpose(1, 2))  # (E, r, r)
        sq = w.pow(2).sum(1) + 2 * s * (wa * b).sum(-1) + s * s * (torch.bmm(b, gram) * b).sum(-1)
        norm = sq.clamp_min(0).sqrt()
    return magnitude / norm


def dora_output(
    base: torch.Tensor, base_dropped: torch.Tensor, lora: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """(R, out) PEFT's DoRA output ``base + (f - 1) W x' + f s B_e A_e x'``: ``base_dropped`` is
    ``W x'``, ``lora`` the rows' ``s B_e A_e x'`` and ``factor`` their experts' ``f`` (R, out)."""
    return base + (factor - 1) * base_dropped + factor * lora
