"""The holder every frozen base weight kept in a stored format lives in: :class:`StoredWeight`.

A holder is an ``nn.Module`` with buffers only (the stored bytes and their scales; frozen parameters
once sharded, see below), a logical ``shape`` and a ``dtype`` it dequantizes to by default (the dtype
the full-precision weight would have). Its stored tensors never change dtype:
``model.to(torch.bfloat16)`` moves them and changes :attr:`StoredWeight.dtype`, but does not round
the fp32 scales nor turn FP8 bytes into bf16 (``nn.Module.to`` casts every floating tensor, and
float8 counts as floating).

A format subclass says how its buffers are filled from a checkpoint:
- quantized while loading (NF4 from a full-precision folder): :meth:`StoredWeight.write` takes
  full-precision pieces at flat offsets of the weight;
- read as released (FP8, INT4, MXFP4): :meth:`StoredWeight.checkpoint_tensors` names the buffers
  the checkpoint's tensors are copied into byte for byte (``weight`` and ``weight_scale_inv`` for
  FP8), with the suffix each one's checkpoint key has after the weight's own key.

Sharded training (FSDP2) shards parameters and leaves buffers whole on every rank, so
:meth:`StoredWeight.hold_as_parameters` turns the stored tensors into frozen parameters (integer
and float8 parameters are allowed when they do not require grad). FSDP then keeps each rank's
slice along dim 0 and all-gathers the whole stored tensors of a layer for its forward and again
for its backward; :meth:`StoredWeight.dequantize` reads whatever tensors the holder has at that
moment, the gathered ones. A scalar (NF4's ``absmax_offset``) cannot be split along dim 0 and
stays a buffer.

So that a rank never holds the whole base in memory before it is sharded, the loader can fill
only the rows a rank will keep (:meth:`StoredWeight.load_rows_of`, :func:`copy_rows`): the other
rows of the tensors are allocated but never written, so the operating system never backs them
with memory, and FSDP drops them when it shards. Until then the holder refuses to dequantize.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import CheckpointError


class StoredWeight(nn.Module):
    """One frozen weight of ``shape`` held in a stored format (buffers only).

    Subclasses register their buffers and implement :meth:`decode` (what :meth:`dequantize` returns);
    ``format`` names the format in messages and summaries.
    """

    format = "?"

    def __init__(self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.shard: tuple[int, int] | None = None  # (rank, world): only that rank's rows were loaded

    def load_rows_of(self, rank: int, world: int) -> None:
        """Let the loader fill only the rows of each stored tensor that FSDP keeps on ``rank`` of
        ``world`` (:func:`fsdp_rows`); the holder cannot dequantize until :meth:`sharded`."""
        self.shard = (rank, world)

    def keeps(self, row: int | None, rows: int) -> bool:
        """Whether this rank loads dim-0 row ``row`` (None: the whole tensor, some rows of which it
        keeps) of a stored tensor of ``rows`` rows."""
        if self.shard is None or row is None:
            return True
        start, end = fsdp_rows(rows, *self.shard)
        return start <= row < end

    def sharded(self, rank: int, world: int) -> None:
        """FSDP now holds this rank's rows, all-gathered when a layer runs: the holder is whole again.

        Raises:
            ValueError: the holder was loaded for another rank or world size.
        """
        if self.shard not in (None, (rank, world)):
            raise ValueError(
                f"a weight loaded for rank {self.shard[0]} of {self.shard[1]} is sharded as {rank} of {world}"
            )
        self.shard = None

    @property
    def device(self) -> torch.device:
        return next(self.stored_tensors()).device

    def stored_tensors(self):
        """The stored values and their scales: this holder's buffers, then its (frozen) parameters."""
        yield from self._buffers.values()
        yield from self._parameters.values()

    def numel(self) -> int:
        return self.shape.numel()

    def storage_bytes(self) -> int:
        """Bytes held: the stored values and their scales (of the whole weight, sharded or not)."""
        return sum(b.numel() * b.element_size() for b in self.stored_tensors())

    def hold_as_parameters(self) -> None:
        """Hold the stored tensors (all but scalars) as frozen parameters, for FSDP to shard."""
        for key, t in list(self._buffers.items()):
            if t is not None and t.ndim > 0:
                del self._buffers[key]
                self.register_parameter(key, nn.Parameter(t, requires_grad=False))

    def layout(self) -> torch.Tensor:
        """A meta tensor of ``shape``: index it like the weight to find a slice's flat offset."""
        return torch.empty(self.shape, device="meta")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight ``shape`` in ``dtype`` (default :attr:`dtype`); a new tensor each call."""
        if self.shard is not None:
            rank, world = self.shard
            raise RuntimeError(
                f"this {self.format} weight holds only rank {rank}'s rows of {world} until the model is sharded"
            )
        return self.decode(dtype or self.dtype)

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """The format's dequantization of the whole weight into ``dtype``."""
        raise NotImplementedError

    def write(self, start: int, values: torch.Tensor) -> None:  # noqa: ARG002 - the interface
        """Quantize full-precision ``values`` into flat positions [start, start + numel)."""
        raise ValueError(f"a {self.format} weight is read as stored, not quantized from full-precision values")

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint-key suffix -> buffer the checkpoint tensor is copied into unchanged; empty
        when the weight is quantized from full-precision values instead (:meth:`write`)."""
        return {}

    def from_checkpoint(self, suffix: str, tensor: torch.Tensor, layout: str) -> torch.Tensor:  # noqa: ARG002
        """The checkpoint tensor of ``suffix`` in the buffer's order, when the family stores the
        full-precision weight in another ``layout`` (a :data:`~moetune.model.hf.LAYOUT_RULES` name)."""
        raise CheckpointError(f"a {self.format} weight in the checkpoint layout '{layout}' is not read yet")

    def checked_suffixes(self) -> tuple[str, ...]:
        """Checkpoint-key suffixes of tensors that describe the weight (its shape) and are checked
        against it, not held."""
        return ()

    @property
    def pending(self) -> bool:
        """True while a piecewise write has started but not finished."""
        return False

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)` reaches every floating buffer, and the stored bytes and scales must only follow
        # the device. The dtype a plain weight would be cast to is read off a zero-size probe.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        kept = {**self._buffers, **self._parameters}
        super()._apply(fn, recurse)
        for key, old in kept.items():
            held = self._buffers if key in self._buffers else self._parameters
            new = held[key]
            if new is not None and new.dtype != old.dtype:
                moved = torch.empty_like(old, device=new.device) if old.is_meta else old.to(new.device)
                held[key] = nn.Parameter(moved, requires_grad=False) if held is self._parameters else moved
        self.dtype = probe.dtype
        return self


def fsdp_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the dim-0 rows FSDP2 keeps on ``rank`` (``torch.chunk``: ceil(rows/world) each)."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def copy_rows(native: torch.Tensor, dest: torch.Tensor, value: torch.Tensor, shard: tuple[int, int] | None) -> None:
    """``dest.copy_(value)``, where ``dest`` is a view of the contiguous ``native``; with ``shard``
    (rank, world) only the part in that rank's dim-0 rows of ``native`` is written. A view this
    cannot place in rows (none the loader makes) is written whole: correct, just not smaller."""
    start, end = (0, native.shape[0]) if shard is None else fsdp_rows(native.shape[0], *shard)
    if shard is None or not native.is_contiguous() or native.ndim == 0:
        dest.copy_(value)
        return
    first = (dest.storage_offset() - native.storage_offset()) // native.stride(0)
    if dest.ndim == native.ndim - 1 and dest.stride() == native.stride()[1:]:  # within one row (an expert)
        if start <= first < end:
            dest.copy_(value)
    elif dest.ndim == native.ndim and dest.stride() == native.stride() and dest.shape[1:] == native.shape[1:]:
        lo, hi = max(start, first) - first, min(end, first + dest.shape[0]) - first
        if lo < hi:
            dest[lo:hi].copy_(value[lo:hi])
    else:
        dest.copy_(value)
