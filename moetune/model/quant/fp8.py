"""Block-scaled FP8, as DeepSeek-V3/R1, GLM-4.5, MiniMax-M2 and the Qwen3 ``-FP8`` releases store it.

Legend: out/in the weight's (last two) dims, bo/bi the block (``weight_block_size``, [128, 128] in
the releases), so = ceil(out/bo), si = ceil(in/bi) the scale grid, E experts.

``config.json`` says ``quantization_config {quant_method: fp8, fmt: e4m3, weight_block_size:
[bo, bi], activation_scheme: dynamic}``. Each quantized weight ``...weight`` (out, in) is
``float8_e4m3fn`` next to a float32 ``...weight_scale_inv`` (so, si); element (i, j) is
``float32(w[i, j]) * scale_inv[i // bo, j // bi]``. Dims that are not multiples of the block
(DeepSeek-V3's ``kv_a_proj_with_mqa``, 576 rows) have a last, partial block that uses its own
scale. Norms, embeddings, routers, the LM head and modules in ``modules_to_not_convert`` are not
quantized (no scale); DeepSeek's ``e_score_correction_bias`` stays float32.

Dequantization multiplies in float32 and rounds once to the compute dtype, the same arithmetic
as transformers' ``Fp8Dequantize`` (tests/model/test_fp8.py compares bit for bit). Experts are
held fused like their full-precision form: ``gate_up_proj`` (E, 2F, D) with the gate rows first
and its scales (E, 2F/bo, D/bi) stacked the same way, which needs F to be a multiple of bo.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .stored import StoredWeight

FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # checkpoint key of a weight's scales: "<weight key>_scale_inv"
# fp32 temporaries of one dequantization step stay below this many elements (~64 MiB).
CHUNK_ELEMENTS = 1 << 24


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scales of a weight of ``shape`` (..., out, in): (..., ceil(out/bo), ceil(in/bi))."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """(..., out, in) float8 weight and (..., so, si) scales -> (..., out, in) in ``dtype``.

    A partial last block (out or in not a multiple of the block) is padded for the product and
    cropped after, so it uses its own block's scale. Leading dims (experts) are done in chunks so
    the float32 temporaries stay small next to the result.
    """
    *lead, rows, cols = weight.shape
    bo, bi = block
    so, si = scale_inv.shape[-2:]
    if (so, si) != (math.ceil(rows / bo), math.ceil(cols / bi)):
        raise ValueError(f"scales {tuple(scale_inv.shape)} do not fit a weight {tuple(weight.shape)} in blocks {block}")
    w3, s3 = weight.reshape(-1, rows, cols), scale_inv.reshape(-1, so, si)
    out = torch.empty(w3.shape, dtype=dtype, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // (so * bo * si * bi))
    for start in range(0, w3.shape[0], step):
        w = w3[start : start + step].float()
        if so * bo != rows or si * bi != cols:
            w = F.pad(w, (0, si * bi - cols, 0, so * bo - rows))
        w = w.view(-1, so, bo, si, bi) * s3[start : start + step].float()[:, :, None, :, None]
        out[start : start + step] = w.view(-1, so * bo, si * bi)[:, :rows, :cols].to(dtype)
    return out.view(weight.shape)


FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) weight -> (float8 weight, (..., so, si) float32 ``weight_scale_inv``).

    The arithmetic of transformers' ``Fp8Quantize`` (per-block max |w| in float32, scale
    ``FP8_MAX / max``, an all-zero block scaled by 1), with a partial last block quantized as if
    zero-padded, so its max is its own.
    """
    *lead, rows, cols = weight.shape
    bo, bi = block
    so, si = math.ceil(rows / bo), math.ceil(cols / bi)
    w = F.pad(weight.float(), (0, si * bi - cols, 0, so * bo - rows)).view(*lead, so, bo, si, bi)
    amax = w.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    q = torch.clamp(w * scale[..., :, None, :, None], min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE)
    q = q.view(*lead, so * bo, si * bi)[..., :rows, :cols].contiguous()
    return q, (1.0 / scale).to(torch.float32)


class FP8Weight(StoredWeight):
    """One frozen weight of ``shape`` as released in block-scaled FP8 (buffers only).

    Buffers, named as in the checkpoint: ``weight`` ``shape`` float8_e4m3fn and ``weight_scale_inv``
    :func:`scale_grid` float32. The loader copies the checkpoint's tensors into them unchanged.
    """

    format = "fp8"

    def __init__(
        self, shape: tuple[int, ...], *, block: tuple[int, int], dtype: torch.dtype = torch.float32, device=None
    ) -> None:
        super().__init__(shape, dtype=dtype)
        self.block = (int(block[0]), int(block[1]))
        self.register_buffer("weight", torch.zeros(self.shape, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(scale_grid(self.shape, self.block), device=device))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"": self.weight, SCALE_SUFFIX: self.weight_scale_inv}

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale_inv, self.block, dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, fp8 e4m3, block={self.block}, dtype={self.dtype}"
