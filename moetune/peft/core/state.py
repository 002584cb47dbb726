"""What peft keeps about a model's adapters besides the adapter layers: one typed object.

The adapter layers (nn.Modules inside the model) hold the weights. What is not a module - each
adapter's :class:`~moetune.config.LoraConfig` and the AdaLoRA rank allocators (budget schedule,
importance EMAs) - lives on one :class:`AdapterState`, set on the model as the attribute
``adapter_state`` by the first :func:`~moetune.peft.core.inject.add_adapter` and returned with its
report (:attr:`~moetune.peft.core.report.AdapterReport.state`). Read it with :func:`adapter_state`.
It also holds the handles of the forward hooks that set the adapter context (:mod:`.context`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...config import LoraConfig

__all__ = ["ATTRIBUTE", "AdapterState", "adapter_state"]

ATTRIBUTE = "adapter_state"


@dataclass
class AdapterState:
    """Adapter bookkeeping of one model.

    Attributes:
        configs: the config of each adapter added to the model, by adapter name.
        allocators: the AdaLoRA rank allocator of each trainable AdaLoRA adapter, by adapter name
            (:class:`~moetune.peft.adalora.allocator.RankAllocator`; built on first use).
        hooked: the model carries the forward hooks that set the adapter context
            (:func:`~moetune.peft.core.context.install_hooks`).
    """

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    allocators: dict[str, Any] = field(default_factory=dict)
    hooked: bool = False


def adapter_state(model: nn.Module) -> AdapterState:
    """``model``'s :class:`AdapterState` (created empty on first use)."""
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        state = AdapterState()
        setattr(model, ATTRIBUTE, state)
    elif not isinstance(state, AdapterState):
        raise TypeError(f"{type(model).__name__}.{ATTRIBUTE} is a {type(state).__name__}, not an AdapterState")
    return state
