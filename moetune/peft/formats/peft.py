"""PEFT's adapter format: ``adapter_config.json`` (exactly PEFT's schema) + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<suffix>``, the suffixes each adapter layer gives in
``peft_tensors`` (linears: ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), DoRA
``lora_magnitude_vector`` (out,); experts: PEFT's ``target_parameters`` layout, or the per-expert
layout of :mod:`.per_expert`). Reading routes every file tensor to the adapted module whose path
prefixes its key; a tensor that reaches no module, a module that gets no tensor and a shape that
does not fit are errors naming the tensor. A folder in PEFT's AdaLoRA layout is read as its
equivalent plain LoRA (:mod:`.adalora`).

PiSSA adapters are saved as the equivalent plain LoRA of rank 2r against the original base
weights (see :mod:`moetune.peft.lora.linear_adapters`), so the file works on the unmodified base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError
from ..core.inject import add_adapter, delete_adapter
from ..core.report import AdapterReport
from ..core.targets import logical_modules
from ..lora.experts_layout import EXPERT_PROJS
from ..lora.linear import LoraLinear
from .adalora import adalora_as_lora
from ..core.layer import layers_holding
from .folder import adapter_files, read_adapter_config, read_tensors, write_adapter_folder
from .peft_config import (
    PEFT_RETARGETED_NAMES,
    PREFIX,
    compact_targets,
    config_from_peft,
    config_to_peft,
    normalise_key,
    rank_alpha,
)
from .peft_meta import moetune_meta
from .fold_scaling import fold_into_b
from .per_expert import SERVING_TASK_TYPE, expert_targets, load_part, native_keys, per_expert_part, zero_pairs
from .wrapper_paths import from_file, to_file

__all__ = ["AdapterFolder", "add_adapter_from", "fill_adapter", "read_adapter_folder", "save_peft"]


def save_peft(
    model: nn.Module,
    out_dir: str | os.PathLike,
    name: str,
    config: LoraConfig,
    *,
    layout: str,
    fold_scaling: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``name`` in PEFT's layout (``layout="peft"``) or with routed experts per
    expert (``"per_expert"``, optionally with the scaling folded into B: :mod:`.fold_scaling`);
    see :func:`moetune.peft.formats.adapters.save_adapter`."""
    tensors, linear_paths, params, patterns, experts = _collect(model, name, layout)
    target_modules = compact_targets(linear_paths, [p for p, _ in logical_modules(model) if p])
    r, alpha, rank_pattern, alpha_pattern = rank_alpha(config, patterns)
    if layout == "peft":
        target_modules, params = _avoid_peft_retargeting(
            model, target_modules, params, set(linear_paths), rank_pattern, alpha_pattern
        )
    for part in experts:
        zero_pairs(part, r)
        tensors.update({f"{PREFIX}{part.path}.{suffix}": t for suffix, t in part.tensors.items()})
    # Zero pairs are listed too when folding for SGLang, whose strict loading refuses unlisted tensors.
    target_modules += list(dict.fromkeys(p for e in experts for p in EXPERT_PROJS if p in e.ranks or fold_scaling))
    targets = {"target_modules": target_modules, "target_parameters": list(dict.fromkeys(params))}
    cfg = config_to_peft(
        config,
        r=r,
        alpha=alpha,
        targets=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model=getattr(model, "source_path", None),
    )
    if experts:  # PEFT reads per-expert names wrongly for some families: make it refuse the folder
        cfg["task_type"] = SERVING_TASK_TYPE
    if layout == "peft":  # PEFT sees a wrapper's paths; servers read the per-expert layout on the text model
        tensors, cfg = to_file(model, tensors, cfg)
    tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in tensors.items()}
    if fold_scaling:
        tensors, cfg = fold_into_b(tensors, cfg)
    meta = moetune_meta(config, name=name, layout=layout) | ({"scaling_folded": True} if fold_scaling else {})
    return write_adapter_folder(Path(out_dir), tensors, cfg, meta=meta, overwrite=overwrite)


def _collect(model: nn.Module, name: str, layout: str) -> tuple[dict, list, list, list, list]:
    """Adapter ``name``'s PEFT tensors, linear paths, target_parameters and rank/alpha entries per
    module, and its routed-experts layers as :class:`~.per_expert.ExpertPart` (``per_expert``)."""
    family = getattr(getattr(model, "args", None), "family", None)
    tensors: dict[str, torch.Tensor] = {}
    linear_paths, params, patterns, experts = [], [], [], []
    for path, layer in layers_holding(model, name):
        if layout == "per_expert" and not isinstance(layer, LoraLinear):
            part = per_expert_part(layer, path, name, family=family)
            experts.append(part)
            patterns += [(key, {key: r}, {key: a}) for p, (r, a) in part.ranks.items() if (key := part.pattern_key(p))]
            continue
        targets = layer.peft_config_targets(path, name=name)
        linear_paths += targets.get("target_modules", [])
        params += targets.get("target_parameters", [])
        patterns.append((path, targets.get("rank_pattern", {}), targets.get("alpha_pattern", {})))
        tensors.update({f"{PREFIX}{path}.{suffix}": t for suffix, t in layer.peft_tensors(name).items()})
    return tensors, linear_paths, params, patterns, experts


def _avoid_peft_retargeting(
    model: nn.Module, modules: list[str], params: list[str], linear_paths: set[str], *patterns: dict
) -> tuple[list[str], list[str]]:
    """Write linears whose names PEFT would retarget to the routed experts (see
    :data:`~.peft_config.PEFT_RETARGETED_NAMES`) as ``<suffix>.weight`` target_parameters; their
    rank/alpha pattern keys (full module paths) get the same ``.weight``, as PEFT looks them up."""
    names = PEFT_RETARGETED_NAMES.get(getattr(getattr(model, "args", None), "family", None), frozenset())
    moved = [t for t in modules if t.rsplit(".", 1)[-1] in names]
    for pattern in patterns:
        for key in [k for k in pattern if k in linear_paths and k.rsplit(".", 1)[-1] in names]:
            pattern[f"{key}.weight"] = pattern.pop(key)
    return [t for t in modules if t not in moved], params + [f"{t}.weight" for t in moved]


def as_plain_lora(raw: Any, tensors: dict[str, torch.Tensor], cfg_file: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A folder's config and tensors as plain LoRA: PEFT's AdaLoRA layout (``peft_type: ADALORA``)
    becomes its equivalent plain LoRA (:func:`~.adalora.adalora_as_lora`); anything else is unchanged."""
    if isinstance(raw, dict) and raw.get("peft_type") == "ADALORA":
        return adalora_as_lora(raw, tensors, where=str(cfg_file))
    return raw, tensors


@dataclass
class AdapterFolder:
    """A PEFT adapter folder read once: its PEFT config as plain LoRA (without moetune's
    metadata), that metadata, and its tensors."""

    cfg_file: Path
    weights: Path
    raw: Any
    meta: dict | None
    tensors: dict[str, torch.Tensor]


def read_adapter_folder(folder: Path) -> AdapterFolder:
    """Read ``folder``'s files (see :func:`read_adapter_config` and :func:`as_plain_lora`)."""
    cfg_file, weights = adapter_files(folder)
    raw, meta = read_adapter_config(cfg_file)
    raw, tensors = as_plain_lora(raw, read_tensors(weights), cfg_file)
    return AdapterFolder(cfg_file, weights, raw, meta, tensors)


def add_adapter_from(model: nn.Module, files: AdapterFolder, name: str) -> AdapterReport:
    """:func:`load_adapter` for a folder already read; nothing is left behind when it fails."""
    files.tensors, files.raw = from_file(model, native_keys(files.tensors), files.raw)  # the text model's paths
    raw = files.raw
    if isinstance(raw, dict) and not (files.meta or {}).get("lora_config"):  # no metadata: targets from the file
        listed = raw.get("target_modules")
        keys = [normalise_key(k) for k in files.tensors]
        targets = expert_targets(keys, listed) if isinstance(listed, list) else None
        raw = raw if targets is None else {**raw, "target_modules": targets}
    config, per_module = config_from_peft(raw, str(files.cfg_file), files.meta)
    try:
        report = add_adapter(model, config, name, per_module=per_module)
    except AdapterError as err:
        raise AdapterError(f"{files.cfg_file}: {err}") from None
    try:
        fill_adapter(model, name, files.tensors, files.weights)
    except BaseException:
        delete_adapter(model, name)
        raise
    return report


def fill_adapter(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Copy file ``tensors`` (PEFT keys, the text model's paths: :func:`~.wrapper_paths.from_file`)
    into adapter ``name``, each to the adapted module whose path prefixes its key; errors name
    ``file`` and the tensor."""
    layers = dict(layers_holding(model, name))
    grouped: dict[str, dict[str, torch.Tensor]] = {path: {} for path in layers}
    for key, tensor in tensors.items():
        body = normalise_key(key)
        tokens = body.split(".")
        path = next((p for i in range(len(tokens) - 1, 0, -1) if (p := ".".join(tokens[:i])) in layers), None)
        if path is None:
            raise AdapterError(
                f"{file}: tensor '{key}' maps to no adapted module of this model (an adapter for "
                "another model, or its adapter_config.json does not target that module)"
            )
        grouped[path][body[len(path) + 1 :]] = tensor
    for path, layer in layers.items():
        part = grouped[path]
        if not part:
            raise AdapterError(f"{file}: no tensors for '{PREFIX}{path}', which the adapter config targets")
        where = f"{file}: {PREFIX}{path}"
        load_part(layer, name, part, where=where)
