"""Grouped GEMM over experts: one matmul per expert on contiguous row ranges.

Rows are sorted by expert; ``offsets`` (E,) int32 holds the cumulative row ends, so expert e owns
rows ``offsets[e-1]:offsets[e]``. Weights are ``(E, out, in)`` like ``nn.Linear``.
``grouped_linear`` uses ``torch.nn.functional.grouped_mm`` (torch >= 2.9) wherever the device has
a kernel for the dtype (CPU: fp32/fp16/bf16; CUDA: bf16 on compute capability >= 8.0) and
otherwise runs :func:`grouped_linear_loop`, the reference with the same signature, saying so once
at INFO. The loop reads the offsets on the host (a device sync per call); the grouped path never does.

Compiled code: dynamo traces ``grouped_mm`` through its meta kernel, which takes bf16 only (the CPU
kernel itself takes fp32 and fp16 too). Under ``torch.compile`` any other dtype, or a device the
kernel does not serve, runs the eager path above as one opaque op (``moetune::grouped_linear``, with
its own backward), so a compiled block has no graph break there and computes what eager computes.

The kernel needs 16-byte aligned row strides. A dimension that misses it (a LoRA rank of 4 in bf16,
an odd expert width) is padded with zeros to the next multiple and the extra output columns are
dropped: zero rows and columns add exact zeros, so the result is the unpadded product.

On CPU the grouped GEMM is one matmul per expert, and in bf16/fp16 oneDNN builds a kernel for
every new shape (0.2-0.3 ms each here, 3-6 ms seen on a loaded machine): with rows per expert
changing every step, a training step met 700-1400 new shapes (its cache holds 1024), and bf16 ran
up to 1.4-1.9x slower than fp32 (docs/benchmarks.md). There each expert's rows are placed at a
multiple of :func:`cpu_row_multiple` rows in a zero-filled buffer of static size (rows + E *
(multiple - 1), so no host sync), which makes shapes repeat; the zero rows give zero outputs, which
are not read back, and add nothing to the weight gradients. Backward is written out so that only
the unpadded rows are kept for it. An experts layer runs up to six GEMMs on the same rows (base and
LoRA, gate_up and down): it places them once (:func:`row_layout`) and passes ``placed=True``, which
took the bf16 attention + experts step from 0.97-0.98x transformers + PEFT to 1.07-1.29x at the
grid's slowest points (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .layers import contiguous_grad

log = logging.getLogger(__name__)
_warned: set[str] = set()


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


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *, placed: bool = False
) -> torch.Tensor:
    """Per-expert ``x_e @ W_e^T``.

    Args:
        x: (N, in) rows sorted by expert.
        weight: (E, out, in).
        offsets: (E,) int32 cumulative row ends; ``offsets[-1] <= N`` (rows past it: no expert's).
        placed: the rows are already in a :func:`row_layout` (CPU bf16/fp16): not placed again.

    Returns:
        (N, out).
    """
    if x.shape[0] == 0:  # grouped_mm's backward rejects empty operands; nothing to sync on either
        return grouped_linear_loop(x, weight, offsets)
    reason = grouped_unsupported(x, weight)
    if torch.compiler.is_compiling() and (reason is not None or x.dtype != torch.bfloat16):
        return grouped_linear_opaque(x, weight, offsets)
    if reason is not None:
        _fallback_once(reason)
        return grouped_linear_loop(x, weight, offsets)
    if _places_rows(x) and not placed:
        return _RowPaddedGroupedLinear.apply(x, weight, offsets, cpu_row_multiple(x.shape[0], offsets.shape[0]))
    return _aligned_grouped_mm(x, weight, offsets)


def _places_rows(x: torch.Tensor) -> bool:
    """Whether the grouped GEMM wants x's rows at multiples per expert: on CPU in bf16/fp16, where
    oneDNN builds a kernel for every new shape."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


class RowLayout(NamedTuple):
    """Expert-sorted rows placed at multiples of a few rows per expert (see the module doc), for
    several grouped GEMMs on the same rows: placed once, taken back once, instead of per call.

    Attributes:
        rows: (n,) where each row goes.
        offsets: (E,) int32 cumulative ends of the placed experts.
        length: rows of the layout, n + E * (multiple - 1); those past ``offsets[-1]`` are no expert's.
    """

    rows: torch.Tensor
    offsets: torch.Tensor
    length: int

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (length, d), zero rows between the experts' rows (they give zero outputs)."""
        return _placed(x, self.rows, self.length)

    def take(self, y: torch.Tensor) -> torch.Tensor:
        """(length, d) -> (n, d): the placed rows' outputs, in the original order."""
        return y.index_select(0, self.rows)


def row_layout(x: torch.Tensor, offsets: torch.Tensor) -> RowLayout | None:
    """The layout :func:`grouped_linear` would place ``x``'s rows in before each GEMM (CPU, bf16 or
    fp16, a grouped kernel for the dtype), for a caller that runs several GEMMs on them; else None."""
    if not _places_rows(x) or x.shape[0] == 0 or grouped_support("cpu", x.dtype):
        return None
    n = x.shape[0]
    return RowLayout(*_rows_at_multiples(offsets, n, cpu_row_multiple(n, offsets.shape[0])))


class _RowPaddedGroupedLinear(torch.autograd.Function):
    """``grouped_linear`` on rows placed at multiples of ``multiple`` per expert. Backward keeps the
    unpadded rows and the (E,) offsets and places the rows again (a copy, a search), so autograd
    holds no more than for the unpadded product."""

    @staticmethod
    def forward(ctx, x, weight, offsets, multiple):
        rows, padded_offsets, length = _rows_at_multiples(offsets, x.shape[0], multiple)
        y = _aligned_grouped_mm(_placed(x, rows, length), weight, padded_offsets).index_select(0, rows)
        keep_x, keep_weight = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        ctx.save_for_backward(x if keep_x else None, weight if keep_weight else None, offsets)
        ctx.n, ctx.multiple = x.shape[0], multiple
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, offsets = ctx.saved_tensors
        rows, offsets, length = _rows_at_multiples(offsets, ctx.n, ctx.multiple)
        grad = _placed(grad_y, rows, length)  # zero on the padding rows: they add nothing below
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # per expert grad_e @ W_e
            grad_x = _aligned_grouped_mm(grad, weight.transpose(-2, -1), offsets).index_select(0, rows)
        if ctx.needs_input_grad[1]:  # per expert grad_e^T @ x_e, as F.linear's weight gradient
            grad_weight = _grouped_weight_grad(grad, _placed(x, rows, length), offsets)
        return grad_x, grad_weight, None, None


def _placed(x: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """(length, d) zeros with x's rows at ``rows``."""
    return x.new_zeros(length, x.shape[1]).index_copy_(0, rows, x)


def _grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(E, out, in): each expert's ``grad_e^T @ x_e``, ``out`` and ``in`` zero-padded to 16 bytes
    where they miss it (zero columns give zero entries, dropped)."""
    multiple = 16 // x.element_size()
    out, inp = grad.shape[1], x.shape[1]
    pad_out, pad_in = _pad_to(out, multiple), _pad_to(inp, multiple)
    if pad_out:
        grad = F.pad(grad, (0, pad_out))
    if pad_in:
        x = F.pad(x, (0, pad_in))
    return F.grouped_mm(grad.t(), x, offs=offsets)[:, :out, :inp]


def cpu_row_multiple(rows: int, experts: int) -> int:
    """What each expert's row count is rounded up to on CPU in bf16/fp16: about an eighth of the
    mean rows per expert, a power of two in [8, 64]. The counts spread by a few square roots of
    their mean, so that is a handful of shapes per matmul, for ~1/16 more rows on average."""
    eighth = rows // max(experts, 1) // 8
    return min(64, max(8, 1 << max(0, eighth.bit_length() - 1)))


def _rows_at_multiples(offsets: torch.Tensor, n: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each of the n rows goes when every expert's rows start at a multiple of ``multiple``:
    (n,) positions, the (E,) int32 offsets of that layout, and its length, n + E * (multiple - 1)
    (a bound known without reading the counts; the rows past the last offset belong to no expert)."""
    ends = offsets.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded_counts = (counts + multiple - 1) // multiple * multiple
    padded_ends = padded_counts.cumsum(0)
    shift = (padded_ends - padded_counts) - (ends - counts)  # each expert's start, moved
    row = torch.arange(n, device=offsets.device)
    rows = row + shift.index_select(0, torch.searchsorted(ends, row, right=True))
    return rows, padded_ends.to(torch.int32), n + offsets.shape[0] * (multiple - 1)


def _aligned_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``grouped_mm`` with ``in`` and ``out`` zero-padded to 16 bytes where they miss it."""
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
    return contiguous_grad(y)


def grouped_linear_loop(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: a Python loop over experts with ``F.linear``. Same signature as the fast path."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    parts = [F.linear(x[s:e], weight[i]) for i, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, weight.shape[1])


@torch.library.custom_op("moetune::grouped_linear", mutates_args=())
def grouped_linear_opaque(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_linear` run eagerly inside compiled code (what the tracer cannot see into)."""
    return grouped_linear(x, weight, offsets)


@grouped_linear_opaque.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:  # noqa: ARG001 - the op's signature
    return x.new_empty(x.shape[0], weight.shape[-2])


@torch.library.custom_op("moetune::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, experts: int) -> torch.Tensor:
    """(E, out, in) gradient of the weight of :func:`grouped_linear`: ``grad_e^T @ x_e`` per expert;
    one grouped GEMM where the device has one for the dtype (fp32 on CPU: what compiled fp32 code
    runs here), else the loop, which reads the offsets on the host as the forward's loop does."""
    if grad.shape[0] and grouped_unsupported(grad, x) is None:
        return _grouped_weight_grad(grad.contiguous(), x.contiguous(), offsets).contiguous()
    ends = offsets.tolist()
    out = grad.new_zeros(experts, grad.shape[1], x.shape[1])
    for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
        if end > start:
            out[e] = grad[start:end].T @ x[start:end]
    return out


@grouped_weight_grad.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, experts: int) -> torch.Tensor:  # noqa: ARG001
    return grad.new_empty(experts, grad.shape[1], x.shape[1])


def _save(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ARG001 - register_autograd's signature
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grouped_linear_opaque(grad, weight.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    grad_w = grouped_weight_grad(grad, x, offsets, weight.shape[0]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_linear_opaque.register_autograd(_backward, setup_context=_save)
