"""Which adapter wrapper each kind of base module gets: one explicit table, no registration by import.

A target module is wrapped by the class listed for its type or, failing that, for the nearest
parent class (the 4-bit types come before ``nn.Linear`` / ``GroupedExperts`` because they
subclass them). A dense SwiGLU FFN gets a :class:`~moetune.peft.mixtures.ffn.MixtureFFN` and a
mixture linear a :class:`~moetune.peft.mixtures.linear.MixtureLinear` only from a mixture config
(see :mod:`moetune.peft.mixtures.plan`), so they are not in this table.

To adapt a new kind of module: write its wrapper (an :class:`~.layer.AdapterLayer`) and add one
line here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from torch import nn

from ...model.moe import GroupedExperts
from ...model.quant import QuantGroupedExperts, QuantLinear
from ..lora.experts import LoraGroupedExperts
from ..lora.linear import LoraLinear
from ..lora.qlora import QLoraGroupedExperts, QLoraLinear
from .layer import AdapterLayer

__all__ = ["WRAPPERS", "base_of", "wrapper_for"]

WRAPPERS: Mapping[type, type[AdapterLayer]] = MappingProxyType(
    {
        QuantLinear: QLoraLinear,
        QuantGroupedExperts: QLoraGroupedExperts,
        nn.Linear: LoraLinear,
        GroupedExperts: LoraGroupedExperts,
    }
)


def base_of(module: nn.Module) -> nn.Module:
    """The frozen module an adapter wrapper stands for (the module itself when unwrapped)."""
    return module.base_layer if isinstance(module, AdapterLayer) else module


def wrapper_for(module: nn.Module) -> type[AdapterLayer] | None:
    """The adapter class listed for the module's (base) type or a parent class, or None."""
    for cls in type(base_of(module)).__mro__:
        if cls in WRAPPERS:
            return WRAPPERS[cls]
    return None
