"""Quantizing a weight to NF4 (:mod:`.nf4`) from pieces that arrive in any order, as the loader
reads a checkpoint: one expert, the gate half of one expert, the whole weight.

Blocks a piece covers whole are quantized at once; the part of a block at a piece's edge waits in
a small fp32 buffer until the rest of that block arrives, so only the block scales of the weight
being filled and at most two partial blocks per piece are held in full precision. On CPU each
chunk of a piece is handed to :mod:`.cpu_workers` (one worker per core) while the loader reads
on; :meth:`BlockQuantizer.result` waits for them.
"""

from __future__ import annotations

import math
from concurrent.futures import Future

import torch

from . import cpu_workers
from .nf4 import BLOCK, chunk_elements, nearest_codes, quantize_blocks, quantize_scales


class BlockQuantizer:
    """Quantizes a weight of n elements that arrives in contiguous pieces, in any order.

    :meth:`write` returns True once every block is in; :meth:`result` then gives the
    double-quantized state.
    """

    def __init__(self, n: int, device: torch.device, block: int = BLOCK, codes: torch.Tensor | None = None) -> None:
        """``codes``: where the packed codes go (ceil(n/2),) uint8, e.g. the weight's own buffer."""
        self.n, self.block = n, block
        self.nb = math.ceil(n / block)
        self.codes = torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=device) if codes is None else codes
        self.absmax = torch.empty(self.nb, dtype=torch.float32, device=device)  # every block is written before use
        self.done = bytearray(self.nb)  # not a tensor: no torch call, so no wait for the workers' GIL
        self.remaining = self.nb  # a counter, not done.all(): a 128-expert weight arrives in 384 pieces
        self.partial: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (values, filled mask)
        self.pending: list[Future] = []  # chunks handed to the CPU workers, not yet waited for
        nearest_codes(torch.empty(0, device=device))  # the table is built here, not by two workers at once

    def _block_end(self, b: int) -> int:
        return min((b + 1) * self.block, self.n)

    def write(self, start: int, values: torch.Tensor) -> bool:
        """Put ``values`` (any shape, numel m) at flat positions [start, start+m)."""
        x = values.reshape(-1)
        if x.device != self.codes.device:
            x = x.to(self.codes.device)  # moved first, widened to fp32 in chunks there
        end = start + x.numel()
        if start < 0 or end > self.n:
            raise ValueError(f"piece [{start}, {end}) lies outside a weight of {self.n} elements")
        if end == start:
            return self.remaining == 0
        first, last = start // self.block, (end - 1) // self.block  # blocks the piece touches
        lo = first if first * self.block >= start else first + 1  # those it covers whole: [lo, hi)
        hi = last + 1 if self._block_end(last) <= end else last
        if lo < hi:
            self._quantize(lo, hi, x[lo * self.block - start : self._block_end(hi - 1) - start])
        for b in {first, last}:  # the two edge blocks, unless the piece covered them whole
            if lo <= b < hi:
                continue
            s, e = max(start, b * self.block), min(end, self._block_end(b))
            self._add_partial(b, s, x[s - start : e - start])
        return self.remaining == 0

    def _quantize(self, lo: int, hi: int, x: torch.Tensor) -> None:
        """Blocks [lo, hi) from x: counted now, quantized by the CPU workers (or here, on a GPU)."""
        self.remaining -= self.done.count(0, lo, hi)  # a block written twice counts once
        self.done[lo:hi] = b"\x01" * (hi - lo)
        step = chunk_elements(x.device, self.block)
        for start in range(0, x.numel(), step):  # whole blocks, but for a weight's short last block at the end
            self._chunk(lo * self.block + start, x[start : start + step])

    def _chunk(self, start: int, x: torch.Tensor) -> None:
        codes = self.codes[start // 2 : start // 2 + math.ceil(x.numel() / 2)]
        absmax = self.absmax[start // self.block : math.ceil((start + x.numel()) / self.block)]
        if x.device.type != "cpu":
            quantize_blocks(x, self.block, out=(codes, absmax))
            return
        self.pending.append(cpu_workers.submit(lambda: quantize_blocks(x, self.block, out=(codes, absmax))))

    def _add_partial(self, b: int, start: int, x: torch.Tensor) -> None:
        size = self._block_end(b) - b * self.block
        values, filled = self.partial.setdefault(
            b, (torch.zeros(size, device=x.device), torch.zeros(size, dtype=torch.bool))
        )
        offset = start - b * self.block
        values[offset : offset + x.numel()] = x
        filled[offset : offset + x.numel()] = True
        if bool(filled.all()):
            self._quantize(b, b + 1, values)
            del self.partial[b]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (ceil(n/2),) uint8, absmax codes (nb,) uint8, scale (nb2,) fp32, offset () fp32."""
        if self.remaining:
            raise ValueError(f"{self.remaining} of {self.nb} blocks were never written")
        while self.pending:
            self.pending.pop().result()  # a worker's error is raised here
        return (self.codes, *quantize_scales(self.absmax))
