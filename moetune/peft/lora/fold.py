"""Folding an adapter into the base weights (``moetune.merge_adapter``).

Each adapter layer folds its own adapters (:meth:`~moetune.peft.core.layer.AdapterLayer.merge`:
``W += s B A`` on linears, DoRA's row scaling, every expert's delta on routed experts); this
module checks the model-level conditions (tied weights) and optionally unloads the adapter.
Combining several adapters into one is a different operation: :mod:`moetune.peft.arithmetic`.
"""

from __future__ import annotations

from torch import nn

from ...errors import AdapterError
from ..core.inject import adapter_configs
from ..core.layer import layers_holding

__all__ = ["fold_adapter"]


def fold_adapter(model: nn.Module, name: str = "default", *, unload: bool = False) -> nn.Module:
    """Fold adapter ``name`` into the base weights (``moetune.merge_adapter``); then
    ``model.save_pretrained`` writes a plain Hugging Face checkpoint with it. Merging twice is a
    no-op; ``layer.unmerge`` undoes it.

    Args:
        unload: also drop the adapter (its effect stays in the weights) and unwrap modules left
            without adapters.

    Raises:
        AdapterError: when a merged module's weight is tied to another (tied embeddings).
    """
    layers = layers_holding(model, name)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for path, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        if weight is not None and counts.get(id(weight), 0) > 1:
            raise AdapterError(
                f"{path}.weight is tied to another weight (tied embeddings); merging adapter "
                f"'{name}' would change both. Untie it first, or keep the adapter unmerged"
            )
    for _, layer in layers:
        layer.merge(name)
    if unload:
        for path, layer in layers:
            if layer.adapter_names == [name]:
                model.set_submodule(path, layer.base_layer)
            else:
                layer.merged.remove(name)
                layer.delete_adapter(name)
                layer.active = [n for n in layer.active if n != name]
        adapter_configs(model).pop(name, None)
    return model
