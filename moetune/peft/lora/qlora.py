"""QLoRA: the LoRA wrappers of quantized base layers (``load_model(..., quantize="nf4")``, or a
checkpoint released quantized such as block-scaled FP8).

A :class:`~moetune.model.quant.QuantLinear` is an ``nn.Linear`` whose ``weight`` is a read-only,
freshly dequantized tensor, and a :class:`~moetune.model.quant.QuantGroupedExperts` is a
``GroupedExperts`` whose ``linear`` takes the stored holders; so :class:`LoraLinear` and
:class:`LoraGroupedExperts` already train, save and load on them unchanged (DoRA included: it
reads the dequantized weight). What they must not do is write into the base weight, which a
quantized base would silently ignore (or re-round): merging and PiSSA init. The subclasses here refuse
both with a clear error (PiSSA through ``base_is_writable``), and are the registered wrappers of
the quantized types in :data:`~moetune.peft.core.registry.WRAPPERS`, which
:func:`~moetune.peft.core.registry.wrapper_for` finds before the ``nn.Linear`` / ``GroupedExperts``
entry because it walks the base type's MRO.

Merging a QLoRA adapter is done as QLoRA recommends: load the base without ``quantize`` and merge
there (the adapter was trained against the dequantized weights, which are within the NF4 bound of
the originals).
"""

from __future__ import annotations

from typing_extensions import override

from ...errors import AdapterError
from .experts import LoraGroupedExperts
from .linear import LoraLinear

_MERGE_HINT = (
    "the base weights are held quantized (quantize='nf4', or a checkpoint released in FP8), so merging "
    "would re-round them; merge the adapter into a full-precision copy of the base (for nf4: load it "
    "without quantize)"
)


class QLoraLinear(LoraLinear):
    """:class:`LoraLinear` on a :class:`QuantLinear`: same adapters and files, no merge, no PiSSA."""

    base_is_writable = False

    def merge(self, name: str) -> None:
        raise AdapterError(f"cannot merge adapter '{name}': {_MERGE_HINT}")

    @override
    def unmerge(self, name: str) -> None:
        return None  # nothing is ever merged into a 4-bit base


class QLoraGroupedExperts(LoraGroupedExperts):
    """:class:`LoraGroupedExperts` on :class:`QuantGroupedExperts`: no merge into the 4-bit experts."""

    def merge(self, name: str) -> None:
        raise AdapterError(f"cannot merge adapter '{name}' into routed experts: {_MERGE_HINT}")

    @override
    def unmerge(self, name: str) -> None:
        return None
