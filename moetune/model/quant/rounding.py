"""Rounding fp32 values to the nearest level of a small sorted map (NF4's 16 levels, the 256 of the
8-bit dynamic map) by table lookup, equal to ``torch.bucketize`` against the midpoints to the bit.

``bucketize`` is a binary search per element: 12-50 ns an element on CPU, most of the time NF4
quantization took at load. Here a 65536-entry table indexed by the upper 16 bits of the fp32 value
(sign, exponent, 7 mantissa bits) gives the level of every value sharing those bits, except in the
few bit ranges a midpoint falls into, where one comparison with that midpoint decides. That is
five element-wise passes (upper bits, two gathers, compare, add), on any device.
"""

from __future__ import annotations

import math

import torch

from .scratch import buffer


class LevelTable:
    """``table(values)``: (m,) fp32 -> (m,) uint8, the number of ``bounds`` strictly below each value
    (the index of the nearest level, ties to the lower one), as ``torch.bucketize(values, bounds)``.

    Values must not be infinite (NaN is fine): the bit ranges holding +-inf hold NaNs too, and are
    given NaN's result. Quantizers never produce them: an infinite input makes its block's
    reciprocal 0, hence NaN.
    """

    def __init__(self, bounds: torch.Tensor) -> None:
        """``bounds`` (k,) sorted fp32 midpoints, k < 256, no two within one 16-bit range."""
        high = torch.arange(65536, dtype=torch.int64) << 16
        ends = torch.stack([high, high | 0xFFFF]).sub_((high >= 2**31).long() << 32).int().view(torch.float32)
        codes = torch.bucketize(torch.where(ends.isinf(), math.nan, ends), bounds)  # magnitude grows with low bits
        low, high_code = codes.min(dim=0).values, codes.max(dim=0).values
        if bool((high_code - low > 1).any()):
            raise ValueError("two midpoints share the upper 16 bits of their fp32 values: a table cannot round them")
        self.low = low.to(torch.uint8)  # (65536,) the level of a range's lowest value
        self.cut = torch.where(high_code > low, bounds[low.clamp(max=bounds.numel() - 1)], math.inf)  # (65536,)
        self.devices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The codes of ``values``, written into ``out`` (m,) uint8 when given."""
        if values.dtype != torch.float32:  # the table reads fp32 bits: another dtype's would be wrong, silently
            raise TypeError(f"LevelTable rounds fp32 values, got {values.dtype}")
        values = values.contiguous().view(-1)
        device, m = values.device, values.numel()
        if device not in self.devices:
            self.devices[device] = (self.low.to(device), self.cut.to(device))
        low, cut = self.devices[device]
        high = buffer("level_high", m, torch.int32, device)  # sign, exponent, 7 bits; any byte order:
        torch.bitwise_right_shift(values.view(torch.int32), 16, out=high).bitwise_and_(0xFFFF)
        out = torch.empty(m, dtype=torch.uint8, device=device) if out is None else out
        torch.index_select(low, 0, high, out=out)
        cuts = torch.index_select(cut, 0, high, out=buffer("level_cut", m, torch.float32, device))
        above = torch.gt(values, cuts, out=buffer("level_above", m, torch.bool, device))
        return out.add_(above.view(torch.uint8))  # as bytes: a bool operand would be widened in a copy first
