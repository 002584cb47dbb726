"""Module swapping, freezing and the trainable-parameter report.

Which modules a config adapts is decided in :mod:`moetune.peft.targets` (its names are importable
from here too). A module that already carries adapters gets the new one in the same wrapper.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError, did_you_mean
from ..adalora.layers import svd_wrapper_for
from .layer import AdapterLayer, adapter_layers, disable_adapters, set_active_adapters
from ..mixtures.plan import place
from .targets import (  # noqa: F401  (targets' public names stay importable from here)
    EXPERT_PARTS,
    ROUTER_NAMES,
    Parts,
    _base,
    alias_map,
    layer_index,
    logical_modules,
    plan_targets,
    targetable_names,
    wrapper_for,
)

__all__ = ["AdapterReport", "add_adapter", "adapter_names", "alias_map", "delete_adapter", "disable_adapters",
           "set_adapter", "targetable_names", "trainable_parameters"]

log = logging.getLogger(__name__)

_GROUP = re.compile(r"^(?:.*\.)?layers\.\d+\.")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


# --- adding, removing, selecting ------------------------------------------------------------
def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config of each adapter added to ``model`` (by name), kept on the model object."""
    if "adapter_configs" not in model.__dict__:
        model.__dict__["adapter_configs"] = {}
    return model.__dict__["adapter_configs"]


def adapter_names(model: nn.Module) -> list[str]:
    names = list(adapter_configs(model))
    for _, layer in adapter_layers(model):
        names += [n for n in layer.adapter_names if n not in names]
    return names


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *,
                per_module: Callable[[str, LoraConfig], LoraConfig] | None = None) -> AdapterReport:
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
        The :class:`AdapterReport` (also logged at INFO).

    Raises:
        AdapterError: bad name, name in use, or a target that matches nothing.
    """
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"add_adapter needs a moetune.LoraConfig, got {type(config).__name__}")
    if not _ADAPTER_NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise AdapterError(f"adapter '{name}' already exists; delete_adapter(model, '{name}') first or use another name")
    plan = plan_targets(model, config)
    _check_pissa(model, plan, config)
    choose = wrapper_for if config.adalora is None else svd_wrapper_for(wrapper_for)  # AdaLoRA: SVD-form wrappers
    placements = place(model, plan, config, choose, layer_index)  # mixtures regroup targets
    active = [n for n in adapter_names(model) if any(n in layer.active for _, layer in adapter_layers(model))]
    created: list[str] = []
    try:
        for path, parts, wrapper, module_config in placements:
            module = model.get_submodule(path)
            if not isinstance(module, AdapterLayer):
                module = wrapper(module)
                model.set_submodule(path, module)
                created.append(path)
            elif not isinstance(module, wrapper):  # e.g. a LoraLinear that now also takes a mixture
                module = _adopt(module, wrapper, path)
            module.add_adapter(name, per_module(path, module_config) if per_module else module_config,
                               parts=set(parts) if parts else None, **_param_configs(module, path, module_config, per_module))
            module.train(model.training)  # new dropout modules must follow eval/train mode, not default to train
    except BaseException:
        _remove(model, name, created)
        raise
    adapter_configs(model)[name] = config
    freeze_base(model, trainable=name)
    set_active_adapters(model, active or [name])
    report = build_report(model, name)
    log.info("%s", report)
    return report


def _adopt(module: AdapterLayer, wrapper: type, path: str) -> AdapterLayer:
    if not hasattr(wrapper, "adopt"):
        raise AdapterError(f"{path} already carries {type(module).__name__} adapters; a {wrapper.__name__} cannot be added to it")
    return wrapper.adopt(module)


def _param_configs(module: AdapterLayer, path: str, config: LoraConfig, per_module) -> dict:
    """``param_configs`` for wrappers that take a config per base parameter (routed experts:
    PEFT's rank_pattern keys them ``<path>.gate_up_proj``), when per-module overrides are given."""
    if per_module is None or "param_configs" not in inspect.signature(module.add_adapter).parameters:
        return {}
    params = [n for n, _ in module.base_layer.named_parameters(recurse=False)]
    return {"param_configs": {p: per_module(f"{path}.{p}", config) for p in params}}


def _check_pissa(model: nn.Module, plan: dict[str, Parts], config: LoraConfig) -> None:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for path in plan:
        module = model.get_submodule(path)
        is_pissa = getattr(module, "is_pissa", lambda n: False)
        existing = module.adapter_names if isinstance(module, AdapterLayer) else []
        if existing and (config.init == "pissa" or any(is_pissa(n) for n in existing)):
            raise AdapterError(f"{path}: a PiSSA adapter changes the base weight, so it must be the only "
                               f"adapter of its module (it already has {existing})")
        weight = getattr(_base(module), "weight", None)
        if config.init == "pissa" and weight is not None and counts.get(id(weight), 0) > 1:
            raise AdapterError(f"{path}: init 'pissa' would change {path}.weight, which is tied to another "
                               "weight (tied embeddings); leave this module out or use another init")


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
            raise AdapterError(f"no adapter named '{n}' in this model{did_you_mean(n, known)} "
                               f"(adapters: {', '.join(known) or 'none'})")


def freeze_base(model: nn.Module, *, trainable: str | None = None) -> None:
    """``requires_grad`` False for every parameter that is not an adapter's, True for those of
    adapter ``trainable``; other adapters' parameters keep theirs."""
    adapters = {id(p) for _, layer in adapter_layers(model) for _, p in layer.adapter_params()}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    if trainable is not None:
        for p in trainable_parameters(model, trainable).values():
            p.requires_grad_(True)


def trainable_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Adapter parameters (of adapter ``name``, or all) keyed by ``<module path>.<local name>``."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in adapter_layers(model):
        if name is None or name in layer.adapter_names:
            for local, p in layer.adapter_params(name):
                out[f"{path}.{local}"] = p
    return out


# --- report ---------------------------------------------------------------------------------
@dataclass
class ReportRow:
    group: str  # module path without the layer prefix, e.g. "self_attn.q_proj"
    modules: int
    params: int


@dataclass
class AdapterReport:
    """What :func:`add_adapter` adapted: per module group, how many modules and parameters.

    Attributes:
        name: the adapter.
        rows: one row per module group (layer index dropped), in model order.
        trainable: parameters of this adapter.
        total: all parameters of the model, adapters included.
    """

    name: str
    rows: list[ReportRow] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        width = max([len("module group"), *(len(r.group) for r in self.rows)])
        lines = [f"adapter '{self.name}'",
                 f"  {'module group':<{width}}  {'modules':>7}  {'trainable':>12}  {'% of model':>10}"]
        for r in self.rows:
            pct = 100.0 * r.params / max(self.total, 1)
            lines.append(f"  {r.group:<{width}}  {r.modules:>7}  {r.params:>12,}  {pct:>9.4f}%")
        lines.append(f"  {'total':<{width}}  {sum(r.modules for r in self.rows):>7}  {self.trainable:>12,}  "
                     f"{self.percent:>9.4f}%   (of {self.total:,} parameters)")
        return "\n".join(lines)


def build_report(model: nn.Module, name: str) -> AdapterReport:
    rows: dict[str, ReportRow] = {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        group = _GROUP.sub("", path)
        row = rows.setdefault(group, ReportRow(group=group, modules=0, params=0))
        row.modules += 1
        row.params += sum(p.numel() for _, p in layer.adapter_params(name))
    total = sum(p.numel() for p in model.parameters())
    return AdapterReport(name=name, rows=list(rows.values()), trainable=sum(r.params for r in rows.values()), total=total)
