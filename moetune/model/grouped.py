"""Grouped GEMM over experts: one matmul per expert on contiguous row ranges.

Rows are sorted by expert; ``offsets`` (E,) int32 holds the cumulative row ends, so expert e owns
rows ``offsets[e-1]:offsets[e]``. Weights are ``(E, out, in)`` like ``nn.Linear``.
``grouped_linear`` uses ``torch.nn.functional.grouped_mm`` (torch >= 2.9, CPU and CUDA) and falls
back to :func:`grouped_linear_loop`, the reference with the same signature, when it cannot run.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_warned: set[str] = set()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward rejects stride-0 gradients (a ``.sum()`` loss produces one).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd.Function signature
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd.Function signature
        return grad.contiguous()


def _fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.info("grouped_mm unavailable (%s); using the per-expert loop", reason)


def _can_group(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        _fallback_once("torch < 2.9")
        return False
    if x.dtype != w.dtype:
        _fallback_once(f"mixed dtypes {x.dtype}/{w.dtype}")
        return False
    # Strides must be 16-byte aligned (in and out dims of every operand).
    size = x.element_size()
    if (w.shape[-1] * size) % 16 or (w.shape[-2] * size) % 16:
        _fallback_once(f"dims {tuple(w.shape[1:])} not 16-byte aligned for {x.dtype}")
        return False
    return True


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert ``x_e @ W_e^T``.

    Args:
        x: (N, in) rows sorted by expert.
        weight: (E, out, in).
        offsets: (E,) int32 cumulative row ends; ``offsets[-1] == N``.

    Returns:
        (N, out).
    """
    if x.shape[0] == 0 or not _can_group(x, weight):
        return grouped_linear_loop(x, weight, offsets)
    y = F.grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=offsets)
    return _ContiguousGrad.apply(y)


def grouped_linear_loop(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: a Python loop over experts with ``F.linear``. Same signature as the fast path."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    parts = [F.linear(x[s:e], weight[i]) for i, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, weight.shape[1])
