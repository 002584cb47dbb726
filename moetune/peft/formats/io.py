"""Adapter folders in PEFT's format (and the per-expert layout vLLM reads); merging into the base.

A folder holds ``adapter_config.json`` (exactly PEFT's schema) and ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.<suffix>``, the suffixes each adapter layer gives in
``peft_tensors`` (linears: ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), DoRA
``lora_magnitude_vector`` (out,); experts: PEFT's ``target_parameters`` layout). Folders are
written to a temporary folder and moved into place when complete, so an existing folder is never
half overwritten. Reading routes every file tensor to the adapted module whose path prefixes its
key; a tensor that reaches no module, a module that gets no tensor and a shape that does not fit
are errors naming the tensor. Pickled adapters (``adapter_model.bin``) are refused.

moetune's own metadata (adapter name, layout, the original config) goes beside them in
``moetune_adapter.json``, not into ``adapter_config.json``, because PEFT warns about every key its
config class does not know. Folders of earlier moetune versions carry it inside
``adapter_config.json`` under ``moetune``; it is read from there when no ``moetune_adapter.json``
exists. The sidecar records a fingerprint of the config it was written with
(:func:`~.peft_format.config_fingerprint`); when ``adapter_config.json`` was later rewritten (PEFT's
``save_pretrained`` into the same folder, a hand edit) so that targets, ranks or dropout no longer
match, the sidecar is ignored with a warning and the PEFT config wins. Sidecars without a
fingerprint are trusted.

PiSSA adapters are saved as the equivalent plain LoRA of rank 2r against the original base
weights (see :mod:`.lora`), so the file works on the unmodified base model.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import AdapterError
from ...outputs import write_folder
from ...safetensors_check import check_safetensors
from ..core.layer import AdapterLayer, adapter_layers
from ..core.inject import AdapterReport, adapter_configs, add_adapter, delete_adapter, logical_modules
from ..lora.linear import LoraLinear
from .peft_config import (FINGERPRINT_KEY, PEFT_RETARGETED_NAMES, PREFIX, compact_targets, config_fingerprint,
                          config_from_peft, config_to_peft, moetune_meta, normalise_key, rank_alpha, split_meta)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "moetune_adapter.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PER_EXPERT_KEY = re.compile(r"^(\d+)\.(\w+)\.lora_[AB]\.weight$")
log = logging.getLogger(__name__)


def _layers(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    layers = [(p, layer) for p, layer in adapter_layers(model) if name in layer.adapter_names]
    if not layers:
        known = sorted({n for _, layer in adapter_layers(model) for n in layer.adapter_names})
        raise AdapterError(f"no adapter named '{name}' in this model (adapters: {', '.join(known) or 'none'})")
    return layers


def _config_targets(layer: AdapterLayer, path: str, name: str) -> dict:
    fn = layer.peft_config_targets
    return fn(path, name=name) if "name" in inspect.signature(fn).parameters else fn(path)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, name: str = "default", *, layout: str = "peft",
                 overwrite: bool = False) -> Path:
    """Write adapter ``name`` as a PEFT adapter folder.

    Args:
        model: the model carrying the adapter.
        out_dir: destination folder: new, empty, or an adapter folder moetune wrote (replaced);
            anything else is refused (see :mod:`moetune.outputs`).
        name: the adapter to write.
        layout: ``"peft"`` (PEFT's keys; loads with ``PeftModel.from_pretrained``) or
            ``"per_expert"`` (routed experts as 2D per-expert pairs
            ``...mlp.experts.{e}.gate_proj.lora_A.weight``, the layout vLLM and SGLang read).
            A mixture of LoRA experts writes moetune's mixture layout for ``"peft"``, or
            MoE-PEFT's MixLoRA layout for ``"moe_peft"`` (see :mod:`.mixture_io`).
        overwrite: write into a non-empty folder moetune did not write, beside its files (never
            replacing or deleting them).

    Returns:
        The folder path.
    """
    config = adapter_configs(model).get(name)
    if layout == "moe_peft" or (config is not None and config.mixture is not None):
        from .mixtures import save_mixture_adapter  # mixtures of LoRA experts have their own layouts

        return save_mixture_adapter(model, out_dir, name, layout=layout, overwrite=overwrite)
    if layout not in ("peft", "per_expert"):
        raise AdapterError(f"layout {layout!r} is not one of 'peft', 'per_expert', 'moe_peft'")
    layers = _layers(model, name)
    if config is None:
        raise AdapterError(f"adapter '{name}' was not added with moetune.add_adapter; its config is unknown")
    tensors: dict[str, torch.Tensor] = {}
    linear_paths, params, patterns, expert_projs = [], [], [], []
    for path, layer in layers:
        if layout == "per_expert" and not isinstance(layer, LoraLinear):
            if not hasattr(layer, "per_expert_tensors"):
                raise AdapterError(f"{path}: {type(layer).__name__} cannot write the per_expert layout")
            part = layer.per_expert_tensors(name)
            expert_projs += [m.group(2) for k in part if (m := _PER_EXPERT_KEY.match(k))]
        else:
            part = layer.peft_tensors(name)
            targets = _config_targets(layer, path, name)
            linear_paths += targets.get("target_modules", [])
            params += targets.get("target_parameters", [])
            patterns.append((path, targets.get("rank_pattern", {}), targets.get("alpha_pattern", {})))
        for suffix, t in part.items():
            tensors[f"{PREFIX}{path}.{suffix}"] = t.detach().to("cpu", torch.float32).contiguous()
    all_paths = [p for p, _ in logical_modules(model) if p]
    target_modules = compact_targets(linear_paths, all_paths)
    r, alpha, rank_pattern, alpha_pattern = rank_alpha(config, patterns)
    if layout == "peft":
        target_modules, params = _avoid_peft_retargeting(model, target_modules, params, set(linear_paths),
                                                         rank_pattern, alpha_pattern)
    target_modules += list(dict.fromkeys(expert_projs))
    cfg = config_to_peft(config, name=name, layout=layout, r=r, alpha=alpha,
                         targets={"target_modules": target_modules, "target_parameters": list(dict.fromkeys(params))},
                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                         base_model=getattr(model, "source_path", None))
    return _write(Path(out_dir), tensors, cfg, meta=moetune_meta(config, name=name, layout=layout), overwrite=overwrite)


def _avoid_peft_retargeting(model: nn.Module, modules: list[str], params: list[str], linear_paths: set[str],
                            *patterns: dict) -> tuple[list[str], list[str]]:
    """Write linears whose names PEFT would retarget to the routed experts (see
    :data:`~.peft_format.PEFT_RETARGETED_NAMES`) as ``<suffix>.weight`` target_parameters; their
    rank/alpha pattern keys (full module paths) get the same ``.weight``, as PEFT looks them up."""
    names = PEFT_RETARGETED_NAMES.get(getattr(getattr(model, "args", None), "family", None), frozenset())
    moved = [t for t in modules if t.rsplit(".", 1)[-1] in names]
    for pattern in patterns:
        for key in [k for k in pattern if k in linear_paths and k.rsplit(".", 1)[-1] in names]:
            pattern[f"{key}.weight"] = pattern.pop(key)
    return [t for t in modules if t not in moved], params + [f"{t}.weight" for t in moved]


def _write(out: Path, tensors: dict[str, torch.Tensor], cfg: dict, *, meta: dict | None = None, overwrite: bool = False,
           inputs: tuple = ()) -> Path:
    """Write the folder's files (``meta``: moetune's metadata, to :data:`META_FILE`, with the
    fingerprint of ``cfg``) as one folder output (see :func:`moetune.outputs.write_folder`), so the
    three files always belong together and nothing moetune did not write is touched."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if meta is not None:
            (tmp / META_FILE).write_text(json.dumps({**meta, FINGERPRINT_KEY: config_fingerprint(cfg)}, indent=2) + "\n")

    return write_folder(out, "adapter", write, overwrite=overwrite, inputs=inputs)


def _adapter_files(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise AdapterError(f"adapter folder '{folder}' does not exist or is not a folder")
    cfg, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg.is_file():
        raise AdapterError(f"'{folder}' has no {CONFIG_FILE} (expected a PEFT adapter folder)")
    if weights.is_file():
        return cfg, weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"'{folder}' holds only a pickled adapter ({pickles[0]}); moetune reads safetensors only, because "
            "unpickling a file can run arbitrary code. Convert it once with PEFT: "
            "PeftModel.from_pretrained(base, path).save_pretrained(out) writes adapter_model.safetensors")
    raise AdapterError(f"'{folder}' has no {WEIGHTS_FILE}")


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_adapter_config(cfg_file: Path) -> tuple[Any, dict | None]:
    """An adapter folder's PEFT config and moetune's metadata: :data:`META_FILE` beside it when
    present and written for this config, else what an earlier moetune embedded in the config
    (taken out of the config)."""
    raw, legacy = split_meta(_read_config(cfg_file))
    meta_file = cfg_file.with_name(META_FILE)
    if not meta_file.is_file():
        return raw, legacy
    meta = _read_meta(meta_file)
    if _stale(meta, raw):
        log.warning("%s was written for another %s (it was rewritten since, e.g. by PEFT's save_pretrained, or edited); "
                    "ignoring it: the targets and ranks in %s apply", meta_file, CONFIG_FILE, CONFIG_FILE)
        return raw, legacy
    return raw, meta


def _stale(meta: dict, raw: Any) -> bool:
    """Whether the sidecar records a fingerprint that ``raw`` no longer has (none recorded: trusted)."""
    recorded = meta.get(FINGERPRINT_KEY)
    return recorded is not None and isinstance(raw, dict) and recorded != config_fingerprint(raw)


def _read_meta(path: Path) -> dict:
    expected = ('a JSON object with moetune\'s adapter metadata, e.g. {"adapter_name": ..., "layout": ..., '
                '"lora_config": {...}} (delete the file to load the folder from adapter_config.json alone)')
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc}); expected {expected}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: found {json.dumps(meta)[:60]}; expected {expected}")
    bad = next((k for k in ("lora_config", "merged") if k in meta and not isinstance(meta[k], dict)), None)
    if bad is not None:
        raise AdapterError(f"{path}: '{bad}' is {meta[bad]!r}, not an object; expected {expected}")
    return meta


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    check_safetensors(weights, error=AdapterError)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise AdapterError(f"{weights}: cannot read safetensors file ({exc})") from None


def as_plain_lora(raw: Any, tensors: dict[str, torch.Tensor], cfg_file: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A folder's config and tensors as plain LoRA: PEFT's AdaLoRA layout (``peft_type: ADALORA``)
    becomes its equivalent plain LoRA (:func:`~.adalora_io.adalora_as_lora`); anything else is unchanged."""
    if isinstance(raw, dict) and raw.get("peft_type") == "ADALORA":
        from .adalora import adalora_as_lora  # it imports this module

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
    cfg_file, weights = _adapter_files(folder)
    raw, meta = read_adapter_config(cfg_file)
    raw, tensors = as_plain_lora(raw, _read_tensors(weights), cfg_file)
    return AdapterFolder(cfg_file, weights, raw, meta, tensors)


def load_adapter(model: nn.Module, in_dir: str | os.PathLike, name: str = "default") -> AdapterReport:
    """Add adapter ``name`` to ``model`` from a PEFT adapter folder (ours or PEFT's own).

    The config is turned into a :class:`~moetune.LoraConfig`, the adapter is created with
    :func:`~moetune.peft.inject.add_adapter` (same targets, base frozen) and filled from the file.
    Nothing is left behind when loading fails.

    Raises:
        AdapterError: unreadable or unsupported folder, a file tensor that maps to no adapted
            module (naming it), a targeted module with no tensors, or a shape mismatch (naming
            the tensor, the expected and the found shape).
    """
    folder = Path(in_dir)
    from .mixtures import is_mixture_folder, load_mixture_adapter

    if is_mixture_folder(folder):  # moetune's mixture layout or MoE-PEFT's MixLoRA
        return load_mixture_adapter(model, folder, name)
    return add_adapter_from(model, read_adapter_folder(folder), name)


def add_adapter_from(model: nn.Module, files: AdapterFolder, name: str) -> AdapterReport:
    """:func:`load_adapter` for a folder already read; nothing is left behind when it fails."""
    config, per_module = config_from_peft(files.raw, str(files.cfg_file), files.meta)
    try:
        report = add_adapter(model, config, name, per_module=per_module)
    except AdapterError as err:
        raise AdapterError(f"{files.cfg_file}: {err}") from None
    try:
        _fill(model, name, files.tensors, files.weights)
    except BaseException:
        delete_adapter(model, name)
        raise
    return report


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
    layers = dict(_layers(model, name))
    grouped: dict[str, dict[str, torch.Tensor]] = {path: {} for path in layers}
    for key, tensor in tensors.items():
        body = normalise_key(key)
        tokens = body.split(".")
        path = next((p for i in range(len(tokens) - 1, 0, -1) if (p := ".".join(tokens[:i])) in layers), None)
        if path is None:
            raise AdapterError(f"{file}: tensor '{key}' maps to no adapted module of this model (an adapter for "
                               "another model, or its adapter_config.json does not target that module)")
        grouped[path][body[len(path) + 1:]] = tensor
    for path, layer in layers.items():
        part = grouped[path]
        if not part:
            raise AdapterError(f"{file}: no tensors for '{PREFIX}{path}', which the adapter config targets")
        where = f"{file}: {PREFIX}{path}"
        if all(_PER_EXPERT_KEY.match(k) for k in part) and hasattr(layer, "load_per_expert_tensors"):
            layer.load_per_expert_tensors(name, part, where=where)
        else:
            layer.load_peft_tensors(name, part, where=where)


def merge_adapter(model: nn.Module, name: str = "default", *, unload: bool = False) -> nn.Module:
    """Fold adapter ``name`` into the base weights (then ``model.save_pretrained`` writes a plain
    Hugging Face checkpoint with it). Merging twice is a no-op; ``layer.unmerge`` undoes it.

    Args:
        unload: also drop the adapter (its effect stays in the weights) and unwrap modules left
            without adapters.

    Raises:
        AdapterError: when a merged module's weight is tied to another (tied embeddings).
    """
    layers = _layers(model, name)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for path, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        if weight is not None and counts.get(id(weight), 0) > 1:
            raise AdapterError(f"{path}.weight is tied to another weight (tied embeddings); merging adapter "
                               f"'{name}' would change both. Untie it first, or keep the adapter unmerged")
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
