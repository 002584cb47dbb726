"""Writing a merged model back in the stored format its base was released in (``moetune merge --requantize``).

Before a stored base is dequantized for merging, :func:`requantize_plan` records which native
weights were stored and how; :meth:`Requantize.tensors` turns each merged checkpoint tensor of those
weights back into the format's tensors (scales recomputed from the merged values) and keeps the
largest difference between the requantized and the merged weights, which the saver reports.
Block-scaled FP8 and pack-quantized INT4 are written back; MXFP4 is not yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from .quant import FP8Weight, Int4Weight, quantized_weights
from .quant.fp8 import SCALE_SUFFIX, dequantize_fp8, quantize_fp8
from .quant.int4 import dequantize_int4, quantize_int4

log = logging.getLogger(__name__)


@dataclass
class Requantize:
    """Native weight names a stored base held, their format and its parameters (FP8 ``block``;
    INT4 ``group`` and scale dtype), and the largest |requantized - merged| seen writing them back."""

    names: set[str]
    formats: set[str]
    block: tuple[int, int] | None = None
    group: int | None = None
    scale_dtype: torch.dtype | None = None
    max_error: float = 0.0

    def check(self) -> Requantize:
        """Raises:
        CheckpointError: the base is stored in a format moetune does not write back yet."""
        if len(self.formats) != 1 or not (self.block or self.group):
            raise CheckpointError(
                f"--requantize writes fp8 and int4 bases back; this base is stored in "
                f"{', '.join(sorted(self.formats))} (merge without --requantize to write it in full precision)"
            )
        return self

    def report(self) -> None:
        log.warning(
            "requantized %d merged weights to %s: max |requantized - merged| %.3g",
            len(self.names),
            "/".join(sorted(self.formats)),
            self.max_error,
        )

    def tensors(self, key: str, merged: torch.Tensor) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of one merged (out, in) weight in the base's format."""
        if self.block is not None:
            q, scale_inv = quantize_fp8(merged, self.block)
            back = dequantize_fp8(q, scale_inv, self.block, torch.float32)
            out = {key: q, key + SCALE_SUFFIX: scale_inv}
        else:  # int4, quantized from the weight in the scales' dtype, as compressed-tensors does
            packed, scale = quantize_int4(merged.to(self.scale_dtype), self.group)
            back = dequantize_int4(packed, scale, merged.shape[-1], torch.float32)
            out = {key + "_packed": packed, key + "_scale": scale, key + "_shape": torch.tensor(merged.shape)}
        self.max_error = max(self.max_error, (back - merged.float()).abs().max().item())
        return out


def requantize_plan(model: nn.Module) -> Requantize | None:
    """What :class:`Requantize` needs, read off a model still holding its stored weights (None when
    it holds none)."""
    held = quantized_weights(model)
    if not held:
        return None
    fp8 = {h.block for h in held.values() if isinstance(h, FP8Weight)}
    int4 = {(h.group, h.weight_scale.dtype) for h in held.values() if isinstance(h, Int4Weight)}
    plan = Requantize(set(held), {h.format for h in held.values()})
    if len(fp8) == 1:
        plan.block = fp8.pop()
    elif len(int4) == 1:
        plan.group, plan.scale_dtype = int4.pop()
    return plan


def checked_plan(model: nn.Module, source) -> Requantize:
    """The plan :func:`requantize_plan` left on ``model`` while loading it from ``source``.

    Raises:
        CheckpointError: the base was not stored quantized, or not in a format written back yet.
    """
    plan = getattr(model, "requantize", None)
    if plan is None:
        raise CheckpointError(f"--requantize: '{source}' is not stored quantized; merge without --requantize")
    return plan.check()
