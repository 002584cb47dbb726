"""Where an adapter's targets go: which wrapper each targeted module gets, with which config.

A plain LoRA config puts the registered wrapper on every target. A mixture config
(``LoraConfig.mixture``) regroups them:

- ``mixlora``: targeted ``gate_proj``/``up_proj``/``down_proj`` of a dense SwiGLU FFN (a dense
  model's ``mlp``, an MoE model's dense layers, ``shared_expert(s)``) become one
  :class:`~.ffn.MixtureFFN` on that FFN, with experts on the targeted projections;
- ``loramoe``: each targeted FFN projection gets a :class:`~.linear.MixtureLinear`;
- ``mola``: every targeted linear gets a :class:`~.linear.MixtureLinear`;
- every other target (attention, routed experts, the LM head) gets a plain LoRA (DoRA with
  ``use_dora``), from the same config without its mixture.

A per-layer expert count (``num_experts: [..]``) is resolved here, per module.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError, ConfigError
from ...model.layers import SwiGLU
from ..core.layer import AdapterLayer
from ..core.registry import base_of, wrapper_for
from ..core.targets import layer_index
from .ffn import PROJS, MixtureFFN
from .common import mixture_config
from .linear import MixtureLinear


class Placement(NamedTuple):
    path: str
    parts: frozenset | None
    wrapper: type[AdapterLayer]
    config: LoraConfig


def _is_ffn(module: nn.Module | None) -> bool:
    return isinstance(module, MixtureFFN) or isinstance(module, SwiGLU)


def place(model: nn.Module, plan: dict[str, frozenset | None], config: LoraConfig) -> list[Placement]:
    """The wrapper and config of every module adapter ``config`` adapts (``plan`` from
    :func:`~moetune.peft.core.targets.plan_targets`).

    Raises:
        AdapterError: a ``mixlora`` config whose targets include no dense FFN projection, or a
            per-layer expert count that does not cover a layer.
    """
    if config.mixture is None:
        return [Placement(p, parts, wrapper_for(model.get_submodule(p)), config) for p, parts in plan.items()]
    kind, plain = config.mixture.kind, dataclasses.replace(config, mixture=None)
    out: list[Placement] = []
    ffns: dict[str, set[str]] = {}
    for path, parts in plan.items():
        module = model.get_submodule(path)
        parent_path, _, leaf = path.rpartition(".")
        in_ffn = leaf in PROJS and _is_ffn(model.get_submodule(parent_path) if parent_path else None)
        if kind == "mixlora" and in_ffn:
            ffns.setdefault(parent_path, set()).add(leaf)
        elif isinstance(base_of(module), nn.Linear) and (kind == "mola" or (kind == "loramoe" and in_ffn)):
            out.append(Placement(path, None, MixtureLinear, _per_layer(config, path)))
        else:
            out.append(Placement(path, parts, wrapper_for(module), plain))
    if kind == "mixlora" and not ffns:
        raise AdapterError(
            "mixture kind mixlora: no target is a projection (gate_proj, up_proj, down_proj) of a dense "
            f"SwiGLU FFN (a dense layer's mlp or a shared expert); targets matched: {', '.join(plan)}"
        )
    out += [Placement(p, frozenset(projs), MixtureFFN, _per_layer(config, p)) for p, projs in ffns.items()]
    return out


def _per_layer(config: LoraConfig, path: str) -> LoraConfig:
    try:
        return mixture_config(config, config.mixture.experts_at(layer_index(path)))
    except ConfigError as err:  # name the module that needs the count
        raise AdapterError(f"{path}: mixture.{err}") from None
