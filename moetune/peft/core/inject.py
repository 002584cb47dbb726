"""Adding and removing adapters: module swapping, freezing, the active adapters.

Which modules a config adapts is decided in :mod:`.targets`, which wrapper each gets in
:mod:`.registry` (and, for mixtures, :mod:`moetune.peft.mixtures.plan`). A module that already
carries adapters gets the new one in the same wrapper (or in a wrapper that takes it over, a
plain linear getting a mixture). Each wrapper makes its own kind of adapter object from the
config; AdaLoRA's SVD form is handed to it explicitly (:func:`~moetune.peft.adalora.adapters.svd_adapter`).
"""

from __future__ import annotations

import logging
import re
from typing import Callable

from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError, did_you_mean
from ..adalora.adapters import svd_adapter
from ..lora.linear import LoraLinear
from ..mixtures.plan import place
from .layer import AdapterLayer, AddOptions, adapter_layers, install_selection_hooks, set_active_adapters
from .params import adapter_parameters
from .registry import base_of
from .report import AdapterReport, build_report
from .state import adapter_state
from .targets import Parts, plan_targets

__all__ = ["add_adapter", "adapter_configs", "adapter_names", "delete_adapter", "freeze_base", "set_adapter"]

log = logging.getLogger(__name__)

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


# --- adding, removing, selecting ------------------------------------------------------------
def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config of each adapter added to ``model`` (by name): ``adapter_state(model).configs``."""
    return adapter_state(model).configs


def adapter_names(model: nn.Module) -> list[str]:
    names = list(adapter_configs(model))
    for _, layer in adapter_layers(model):
        names += [n for n in layer.adapter_names if n not in names]
    return names


def add_adapter(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    *,
    per_module: Callable[[str, LoraConfig], LoraConfig] | None = None,
) -> AdapterReport:
    """Add LoRA adapter ``name`` to the modules ``config`` targets and freeze the base.

    Every parameter that is not an adapter parameter gets ``requires_grad=False``; the new
    adapter's parameters are trainable, and other adapters keep their ``requires_grad`` (one the
    user froze stays frozen). The new adapter becomes the active one when no adapter is active
    yet (see :func:`set_adapter`).

    Args:
        model: a model from :func:`moetune.load_model` (any nn.Module with HF module names).
        config: the LoRA options and targets.
        name: adapter name (letters, digits, ``_``, ``-``).
        per_module: optional ``(module path, config) -> config`` for per-module rank/alpha
            (used to honour PEFT's ``rank_pattern``/``alpha_pattern`` when loading); wrappers
            whose ``add_adapter`` takes ``param_configs`` get it per base parameter too, asked
            as ``<module path>.<parameter name>``.

    Returns:
        The :class:`AdapterReport` (also logged at INFO); ``.state``: the model's :class:`~.state.AdapterState`.

    Raises:
        AdapterError: bad name, name in use, or a target that matches nothing.
    """
    _check_new(model, config, name)
    plan = plan_targets(model, config)
    _check_pissa(model, plan, config)
    placements = place(model, plan, config)  # mixtures regroup targets
    active = [n for n in adapter_names(model) if any(n in layer.active for _, layer in adapter_layers(model))]
    created: list[str] = []
    try:
        for path, parts, wrapper, module_config in placements:
            module = _wrapped(model, path, wrapper, created)
            _add_to(module, path, name, module_config, parts, per_module)
            module.train(model.training)  # new dropout modules must follow eval/train mode, not default to train
    except BaseException:
        _remove(model, name, created)
        raise
    adapter_configs(model)[name] = config
    install_selection_hooks(model)
    freeze_base(model, trainable=name)
    set_active_adapters(model, active or [name])
    report = build_report(model, name, state=adapter_state(model))
    log.info("%s", report)
    return report


def _check_new(model: nn.Module, config: LoraConfig, name: str) -> None:
    """A LoraConfig and a valid name not yet in use."""
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"add_adapter needs a moetune.LoraConfig, got {type(config).__name__}")
    if not _ADAPTER_NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise AdapterError(
            f"adapter '{name}' already exists; delete_adapter(model, '{name}') first or use another name"
        )


def _wrapped(model: nn.Module, path: str, wrapper: type[AdapterLayer], created: list[str]) -> AdapterLayer:
    """The module at ``path`` in a ``wrapper`` (new, the one it has, or one taking it over)."""
    module = model.get_submodule(path)
    if not isinstance(module, AdapterLayer):
        module = wrapper(module)
        created.append(path)
    elif not isinstance(module, wrapper):  # e.g. a LoraLinear that now also takes a mixture
        module = wrapper.take_over(module, path)
    else:
        return module
    model.set_submodule(path, module)
    return module


def _add_to(module: AdapterLayer, path: str, name: str, config: LoraConfig, parts: Parts, per_module) -> None:
    """Add adapter ``name`` to one wrapper, with per-module and per-parameter configs from
    ``per_module`` (PEFT's rank_pattern keys a routed-experts parameter ``<path>.gate_up_proj``)."""
    param_configs = None
    if per_module is not None:
        params = [n for n, _ in module.base_layer.named_parameters(recurse=False)]
        param_configs = {p: per_module(f"{path}.{p}", config) for p in params}
    module_config = per_module(path, config) if per_module else config
    adapter = None if module_config.adalora is None else svd_adapter(module, name, module_config, param_configs)
    module.add_adapter(name, module_config, AddOptions(frozenset(parts or ()) or None, param_configs, adapter))


def _check_pissa(model: nn.Module, plan: dict[str, Parts], config: LoraConfig) -> None:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for path in plan:
        module = model.get_submodule(path)
        existing = module.adapter_names if isinstance(module, AdapterLayer) else []
        pissa = isinstance(module, LoraLinear) and any(module.is_pissa(n) for n in existing)
        if existing and (config.init == "pissa" or pissa):
            raise AdapterError(
                f"{path}: a PiSSA adapter changes the base weight, so it must be the only "
                f"adapter of its module (it already has {existing})"
            )
        if config.init != "pissa":
            continue  # and a stored base is not dequantized just to look at its weight
        weight = getattr(base_of(module), "weight", None)
        if weight is not None and counts.get(id(weight), 0) > 1:
            raise AdapterError(
                f"{path}: init 'pissa' would change {path}.weight, which is tied to another "
                "weight (tied embeddings); leave this module out or use another init"
            )


def _remove(model: nn.Module, name: str, paths: list[str] | None = None) -> None:
    """Delete adapter ``name`` everywhere; unwrap modules left without adapters."""
    for path, layer in list(adapter_layers(model)):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
            layer.active = [n for n in layer.active if n != name]
        if not layer.adapter_names and (paths is None or path in paths):
            model.set_submodule(path, layer.base_layer)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if merged); empty wrappers are unwrapped."""
    _require(model, [name])
    _remove(model, name)
    adapter_configs(model).pop(name, None)


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the adapters that run when a forward does not pass ``adapter_names``."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    set_active_adapters(model, names)


def _require(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise AdapterError(
                f"no adapter named '{n}' in this model{did_you_mean(n, known)} (adapters: {', '.join(known) or 'none'})"
            )


def freeze_base(model: nn.Module, *, trainable: str | None = None) -> None:
    """``requires_grad`` False for every parameter that is not an adapter's, True for those of
    adapter ``trainable``; other adapters' parameters keep theirs."""
    adapters = {id(p) for _, layer in adapter_layers(model) for _, p in layer.adapter_params()}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    if trainable is not None:
        for p in adapter_parameters(model, trainable).values():
            p.requires_grad_(True)
