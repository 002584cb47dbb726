"""Writing a merged model back in the stored format its base was released in (``moetune merge --requantize``).

Before a stored base is dequantized for merging, :func:`requantize_plan` records which native
weights were stored and how; :meth:`Requantize.tensors` turns each merged checkpoint tensor of those
weights back into the format's tensors (block scales recomputed from the merged values) and keeps the
largest difference between the requantized and the merged weights, which the saver reports.
Only block-scaled FP8 is written back so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from .quant import FP8Weight, quantized_weights
from .quant.fp8 import SCALE_SUFFIX, dequantize_fp8, quantize_fp8

log = logging.getLogger(__name__)


@dataclass
class Requantize:
    """Native weight names a stored base held, their formats and FP8 ``block``, and the largest
    |requantized - merged| seen while writing them back."""

    names: set[str]
    formats: set[str]
    block: tuple[int, int] | None
    max_error: float = 0.0

    def check(self) -> Requantize:
        """Raises:
        CheckpointError: the base is stored in a format moetune does not write back yet."""
        if self.formats != {"fp8"} or self.block is None:
            raise CheckpointError(
                f"--requantize writes block-scaled fp8 bases back; this base is stored in "
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
        """The checkpoint tensors of one merged (out, in) weight: ``key`` float8, ``key_scale_inv``."""
        q, scale_inv = quantize_fp8(merged, self.block)
        back = dequantize_fp8(q, scale_inv, self.block, torch.float32)
        self.max_error = max(self.max_error, (back - merged.float()).abs().max().item())
        return {key: q, key + SCALE_SUFFIX: scale_inv}


def requantize_plan(model: nn.Module) -> Requantize | None:
    """What :class:`Requantize` needs, read off a model still holding its stored weights (None when
    it holds none)."""
    held = quantized_weights(model)
    if not held:
        return None
    blocks = {h.block for h in held.values() if isinstance(h, FP8Weight)}
    block = blocks.pop() if len(blocks) == 1 else None
    return Requantize(set(held), {h.format for h in held.values()}, block)


def checked_plan(model: nn.Module, source) -> Requantize:
    """The plan :func:`requantize_plan` left on ``model`` while loading it from ``source``.

    Raises:
        CheckpointError: the base was not stored quantized, or not in a format written back yet.
    """
    plan = getattr(model, "requantize", None)
    if plan is None:
        raise CheckpointError(f"--requantize: '{source}' is not stored quantized; merge without --requantize")
    return plan.check()
