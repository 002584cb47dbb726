"""One frozen 4-bit (NF4) weight: :class:`NF4Weight`, the buffers-only holder the QLoRA modules of
:mod:`.modules` keep their base weights in (format in :mod:`.nf4`).

A holder can be filled whole or piecewise (:meth:`NF4Weight.write`), so the loader can allocate
~0.52 bytes per weight element and quantize each checkpoint tensor as it is read; it dequantizes
into any dtype on demand and keeps its fp32 scales fp32 through ``model.to(dtype)``.
"""

from __future__ import annotations

import math

import torch

from . import nf4, nf4_pieces
from .stored import StoredWeight


class NF4Weight(StoredWeight):
    """One frozen weight of ``shape`` in NF4 with double-quantized block scales (buffers only).

    Buffers: ``codes`` (ceil(n/2),) uint8, ``absmax_codes`` (nb,) uint8, ``absmax_scale`` (nb2,)
    fp32, ``absmax_offset`` () fp32. ``dtype`` is the dtype it dequantizes to by default (the
    dtype the full-precision weight would have); ``model.to(dtype)`` changes it but never rounds
    the fp32 scales.
    """

    format = "nf4"

    def __init__(self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(shape, dtype=dtype)
        n = self.shape.numel()
        nb = math.ceil(n / nf4.BLOCK)
        self.register_buffer("codes", torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.zeros(nb, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scale", torch.zeros(math.ceil(nb / nf4.SCALE_BLOCK), device=device))
        self.register_buffer("absmax_offset", torch.zeros((), device=device))
        self._writer: nf4_pieces.BlockQuantizer | None = None

    @torch.no_grad()
    def write(self, start: int, values: torch.Tensor) -> None:
        """Quantize ``values`` into flat positions [start, start + numel) of the weight.

        Pieces may come in any order; the block scales are double-quantized once the last piece
        is in, and only then is the weight usable.
        """
        if self._writer is None:
            self._writer = nf4_pieces.BlockQuantizer(self.numel(), self.device, codes=self.codes)
        if self._writer.write(start, values):
            _, absmax_codes, scale, offset = self._writer.result()  # the codes are in self.codes already
            self.absmax_codes.copy_(absmax_codes)
            self.absmax_scale.copy_(scale)
            self.absmax_offset.copy_(offset)
            self._writer = None

    @property
    def pending(self) -> bool:
        """True while a piecewise write has started but not finished."""
        return self._writer is not None

    def block_absmax(self) -> torch.Tensor:
        """(nb,) fp32 first-level scales, after undoing the double quantization."""
        return nf4.dequantize_scales(self.absmax_codes, self.absmax_scale, self.absmax_offset)

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        flat = nf4.dequantize_blocks(self.codes, self.block_absmax(), self.numel(), dtype)
        return flat.view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, nf4, block={nf4.BLOCK}, double-quant={nf4.SCALE_BLOCK}, dtype={self.dtype}"
