"""The one listing of adapter parameters: optimizers, freezing, checkpoints and the public
:func:`moetune.trainable_parameters` all read it.

Keys are ``<module path>.<local name>`` (``model.layers.0.self_attn.q_proj.lora_A.default``).
Every parameter of the adapter is listed whatever its ``requires_grad``: an adapter the user froze
stays frozen (nothing here changes it), and a caller building an optimizer sees which are frozen.
"""

from __future__ import annotations

from torch import nn

from .layer import adapter_layers

__all__ = ["AdapterParams", "adapter_parameters", "trainable_parameters"]


class AdapterParams(dict):
    """Parameters of one adapter (or all) keyed by ``<module path>.<local name>``; ``b_side``
    holds the keys of the output-side ("B") matrices, as their adapter layers declare them."""

    def __init__(self, params: dict[str, nn.Parameter] | None = None, *, b_side: set[str] | None = None) -> None:
        super().__init__(params or {})
        self.b_side: set[str] = set(b_side or ())


def adapter_parameters(model: nn.Module, name: str | None = None) -> AdapterParams:
    """Parameters of adapter ``name`` (of every adapter when None) keyed by ``<module path>.<local name>``."""
    out = AdapterParams()
    for path, layer in adapter_layers(model):
        if name is not None and name not in layer.adapter_names:  # adapters with different targets
            continue
        for local, p in layer.adapter_params(name):
            out[f"{path}.{local}"] = p
        out.b_side.update(f"{path}.{local}" for local, _ in layer.b_side_params(name))
    return out


trainable_parameters = adapter_parameters  # its public name (moetune.trainable_parameters)
