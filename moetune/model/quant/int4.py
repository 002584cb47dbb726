"""INT4 in the ``compressed-tensors`` ``pack-quantized`` format (Kimi-K2-Thinking and later Kimi releases).

Legend: out/in the weight's (last two) dims, g the group size (32 in the releases), E experts.

``config.json`` says ``quantization_config {quant_method: compressed-tensors, format: pack-quantized,
config_groups: {...: {weights: {num_bits: 4, type: int, symmetric: true, strategy: group,
group_size: g}}}, ignore: [...]}``. Each quantized weight ``...weight`` is stored as:
- ``...weight_packed`` (out, in/8) int32: eight 4-bit values per word, element j of a row in bits
  4*(j % 8) .. 4*(j % 8) + 3 of word j // 8, each value stored as q + 8 (q in [-8, 7]);
- ``...weight_scale`` (out, in/g) in the checkpoint's dtype (bf16 in the releases): one scale per
  group of g consecutive inputs; element (i, j) is ``q[i, j] * scale[i, j // g]``, multiplied in the
  scale's dtype (as ``compressed_tensors``' dequantize does), then cast to the compute dtype;
- ``...weight_shape`` (2,) int: (out, in), checked against the config, not held.

Experts are held fused like their full-precision form (``gate_up_proj`` (E, 2F, D) gate rows
first); packing and groups run along the input dim, so stacking rows needs nothing more.
"""

from __future__ import annotations

import torch

from .stored import StoredWeight

BITS = 4
PER_WORD = 32 // BITS
MARKER = "_packed"  # checkpoint key of a packed weight: "<weight key>_packed"
# int32 temporaries of one dequantization step stay below this many elements (~64 MiB).
CHUNK_ELEMENTS = 1 << 24


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """(..., ceil(cols/8)) int32 words -> (..., cols) int32 values in [-8, 7]."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & 0xF  # low nibble first; the sign of >> never reaches it
    return values.flatten(-2)[..., :cols] - (1 << (BITS - 1))


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., out, in/8) packed and (..., out, in/g) scales -> (..., out, in) in ``dtype``."""
    rows, groups = scale.shape[-2:]
    p3, s3 = packed.reshape(-1, rows, packed.shape[-1]), scale.reshape(-1, rows, groups)
    out = torch.empty((p3.shape[0], rows, cols), dtype=dtype, device=packed.device)
    step = max(1, CHUNK_ELEMENTS // (rows * cols))
    for start in range(0, p3.shape[0], step):
        q = unpack_int4(p3[start : start + step], cols).to(scale.dtype).unflatten(-1, (groups, cols // groups))
        out[start : start + step] = (q * s3[start : start + step].unsqueeze(-1)).flatten(-2).to(dtype)
    return out.view(*scale.shape[:-1], cols)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) weight -> ((..., out, in/8) int32 packed, (..., out, in/g) scales in the weight's dtype).

    The arithmetic of compressed-tensors' symmetric group quantization (``calculate_qparams``, then
    ``quantize`` and ``pack_to_int32``), in the weight's dtype: scale = max |w| of the group / 7.5
    (the smallest positive number of that dtype for an all-zero group), q = round(clamp(w / scale, -8, 7)).
    """
    groups = weight.unflatten(-1, (weight.shape[-1] // group, group))
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = torch.maximum(low.abs(), high.abs()) / torch.tensor(15, dtype=weight.dtype).div(2)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    q = torch.round(torch.clamp(groups / scale.unsqueeze(-1), -8, 7)).flatten(-2).to(torch.int64) + 8
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=weight.device)
    words = (q.unflatten(-1, (-1, PER_WORD)) << shifts).sum(-1)  # disjoint nibbles: the sum is their OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), scale


class Int4Weight(StoredWeight):
    """One frozen weight of ``shape`` as released in pack-quantized INT4 (buffers only).

    Buffers, named as in the checkpoint: ``weight_packed`` (..., out, in/8) int32 and
    ``weight_scale`` (..., out, in/g) in ``scale_dtype``.
    """

    format = "int4"

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        group: int,
        scale_dtype: torch.dtype,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__(shape, dtype=dtype)
        *lead, rows, cols = self.shape
        if cols % group or group % PER_WORD:
            raise ValueError(f"a weight with {cols} inputs cannot hold int4 groups of {group}")
        self.group = group
        packed = torch.zeros((*lead, rows, cols // PER_WORD), dtype=torch.int32, device=device)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", torch.ones((*lead, rows, cols // group), dtype=scale_dtype, device=device))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {MARKER: self.weight_packed, "_scale": self.weight_scale}

    def checked_suffixes(self) -> tuple[str, ...]:
        return ("_shape",)

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.weight_packed, self.weight_scale, self.shape[-1], dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, int4 pack-quantized, group={self.group}, dtype={self.dtype}"
