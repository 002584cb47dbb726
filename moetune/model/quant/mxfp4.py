"""MXFP4, as gpt-oss stores its routed experts.

Legend: E experts, out/in a weight's dims, G = in/32 blocks per row, F expert hidden, D model dim.

``config.json`` says ``quantization_config {quant_method: mxfp4, modules_to_not_convert: [...]}``.
An expert projection ``...experts.gate_up_proj`` is stored as ``..._blocks`` (E, out, G, 16) uint8
(32 e2m1 values per block, two per byte, the low nibble first) and ``..._scales`` (E, out, G) uint8
(an e8m0 exponent per block): element (i, 32 g + j) is ``FP4[nibble] * 2 ** (scale[i, g] - 127)``.
Unlike the full-precision gpt-oss tensors, which are transposed (E, in, out), the blocks run along
the input dim, so the stored rows are output features; gpt-oss interleaves gate and up rows
(gate_0, up_0, gate_1 ...), which :meth:`MXFP4Weight.from_checkpoint` turns into our gate-rows-first
order by permuting whole rows of bytes (exact).

Every product is a power-of-two multiple of an e2m1 value, so the dequantized weight is exact in
float32 and bfloat16 and matches transformers' ``convert_moe_packed_tensors`` bit for bit.
"""

from __future__ import annotations

import torch

from .stored import StoredWeight

BLOCK = 32
MARKER = "_blocks"  # checkpoint key of a weight's blocks: "<weight key>_blocks"
# The 16 e2m1 values by nibble (sign bit 3), as the OCP MX spec and transformers' FP4_VALUES list them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# float32 temporaries of one dequantization step stay below this many elements (~64 MiB).
CHUNK_ELEMENTS = 1 << 24


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., out, G, 16) uint8 blocks and (..., out, G) uint8 exponents -> (..., out, 32 G) in ``dtype``."""
    *lead, rows, groups, half = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b3, s3 = blocks.reshape(-1, rows, groups, half), scales.reshape(-1, rows, groups)
    out = torch.empty((b3.shape[0], rows, groups * 2 * half), dtype=dtype, device=blocks.device)
    step = max(1, CHUNK_ELEMENTS // (rows * groups * 2 * half))
    for start in range(0, b3.shape[0], step):
        b = b3[start : start + step]
        values = torch.stack((lut[(b & 0x0F).int()], lut[(b >> 4).int()]), dim=-1).flatten(-2)  # (n, out, G, 32)
        values = torch.ldexp(values, s3[start : start + step].int().unsqueeze(-1) - 127)
        out[start : start + step] = values.flatten(-2).to(dtype)
    return out.view(*lead, rows, groups * 2 * half)


def _deinterleave_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows gate_0, up_0, gate_1, up_1 ... along ``dim`` -> all gate rows, then all up rows."""
    return t.unflatten(dim, (t.shape[dim] // 2, 2)).transpose(dim, dim + 1).flatten(dim, dim + 1)


class MXFP4Weight(StoredWeight):
    """One frozen weight of ``shape`` (..., out, in) as gpt-oss stores it in MXFP4 (buffers only).

    Buffers: ``blocks`` (..., out, in/32, 16) uint8 and ``scales`` (..., out, in/32) uint8.
    """

    format = "mxfp4"

    def __init__(self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(shape, dtype=dtype)
        *lead, rows, cols = self.shape
        if cols % BLOCK:
            raise ValueError(f"a weight with {cols} inputs cannot hold mxfp4 blocks of {BLOCK}")
        grid = (*lead, rows, cols // BLOCK)
        self.register_buffer("blocks", torch.zeros((*grid, BLOCK // 2), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.full(grid, 127, dtype=torch.uint8, device=device))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {MARKER: self.blocks, "_scales": self.scales}

    def from_checkpoint(self, suffix: str, tensor: torch.Tensor, layout: str) -> torch.Tensor:
        # The stored blocks are (out, in) whatever the full-precision layout; only the interleaving of
        # gate and up rows carries over.
        if layout == "transposed":
            return tensor
        if layout == "interleaved_transposed":
            return _deinterleave_rows(tensor, tensor.ndim - (3 if suffix == MARKER else 2))
        return super().from_checkpoint(suffix, tensor, layout)

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_mxfp4(self.blocks, self.scales, dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, mxfp4, block={BLOCK}, dtype={self.dtype}"
