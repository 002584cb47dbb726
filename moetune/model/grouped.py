"""Grouped GEMM over experts: one matmul per expert on contiguous row ranges.

Rows are sorted by expert; ``offsets`` (E,) int32 holds the cumulative row ends, so expert e owns
rows ``offsets[e-1]:offsets[e]``. Weights are ``(E, out, in)`` like ``nn.Linear``.
``grouped_linear`` uses ``torch.nn.functional.grouped_mm`` (torch >= 2.9) wherever the device has
a kernel for the dtype (CPU: fp32/fp16/bf16; CUDA: bf16 on compute capability >= 8.0) and
otherwise runs :func:`grouped_linear_loop`, the reference with the same signature, saying so once
at INFO. The loop reads the offsets on the host (a device sync per call); the grouped path never does.

The kernel needs 16-byte aligned row strides. A dimension that misses it (a LoRA rank of 4 in bf16,
an odd expert width) is padded with zeros to the next multiple and the extra output columns are
dropped: zero rows and columns add exact zeros, so the result is the unpadded product.
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


def _cuda_capability(index: int | None) -> tuple[int, int]:
    # get_device_properties is cached by torch and constant-folded by dynamo (get_device_capability is not)
    props = torch.cuda.get_device_properties(index)
    return props.major, props.minor


def grouped_support(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str | None:
    """Why ``grouped_mm`` has no kernel for ``dtype`` on this device kind, or None when it has.

    Args:
        capability: the CUDA compute capability (CUDA only).
    """
    if not hasattr(F, "grouped_mm"):
        return "torch < 2.9"
    if device_type == "cpu":
        return None if dtype in (torch.float32, torch.float16, torch.bfloat16) else f"{dtype} on CPU"
    if device_type == "cuda":
        if dtype != torch.bfloat16:
            return f"the CUDA grouped GEMM takes bfloat16 only, not {dtype}"
        return None if capability is None or capability >= (8, 0) else "the CUDA grouped GEMM needs sm >= 80"
    return f"no grouped GEMM on {device_type}"


def grouped_unsupported(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why ``grouped_mm`` cannot multiply these operands on their device, or None when it can."""
    if x.dtype != w.dtype:
        return f"mixed dtypes {x.dtype}/{w.dtype}"
    capability = _cuda_capability(x.device.index) if x.device.type == "cuda" else None
    return grouped_support(x.device.type, x.dtype, capability)


def _pad_to(n: int, multiple: int) -> int:
    return -n % multiple


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert ``x_e @ W_e^T``.

    Args:
        x: (N, in) rows sorted by expert.
        weight: (E, out, in).
        offsets: (E,) int32 cumulative row ends; ``offsets[-1] == N``.

    Returns:
        (N, out).
    """
    if x.shape[0] == 0:  # grouped_mm's backward rejects empty operands; nothing to sync on either
        return grouped_linear_loop(x, weight, offsets)
    reason = grouped_unsupported(x, weight)
    if reason is not None:
        _fallback_once(reason)
        return grouped_linear_loop(x, weight, offsets)
    multiple = 16 // x.element_size()
    out = weight.shape[-2]
    pad_in, pad_out = _pad_to(weight.shape[-1], multiple), _pad_to(out, multiple)
    if pad_in:
        x, weight = F.pad(x, (0, pad_in)), F.pad(weight, (0, pad_in))
    if pad_out:
        weight = F.pad(weight, (0, 0, 0, pad_out))
    y = F.grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=offsets)
    if pad_out:
        y = y[:, :out].contiguous()
    return _ContiguousGrad.apply(y)


def grouped_linear_loop(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: a Python loop over experts with ``F.linear``. Same signature as the fast path."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    parts = [F.linear(x[s:e], weight[i]) for i, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, weight.shape[1])
