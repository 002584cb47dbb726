"""Adapter files of a text model loaded from a multimodal wrapper (Kimi-K2.5, Qwen3.5-MoE).

PEFT sees such a model as the wrapper, so files for it name the wrapper's module paths
(``model.language_model.layers...``; :func:`moetune.model.wrappers.wrapped_path`), while moetune's
modules are the text model's (``model.layers...``). Every writer of module paths - PEFT's layout,
moetune's mixture layout, PEFT's AdaLoRA layout, merged adapters - passes its tensors and config
through :func:`to_file`, and every reader takes a folder's through :func:`from_file` before
anything else, so one mapping serves all formats and the rest of the code sees native paths only.
A file that names the text model's own paths reads as well (older moetune files).

Left out by design: the per-expert layout names the text model itself, what a server reads for it
(vLLM 0.33's Kimi-K2.5 wrapper takes no LoRA - no ``SupportsLoRA`` -, so vLLM serves the adapter on
the text model, DeepSeek-V3; SGLang finds modules by layer and name), and MoE-PEFT's keys
(``mixlora.layers.<l>...``) name no module path.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ...model.wrappers import native_path, wrapped_path
from .peft_config import PREFIX

# adapter_config.json entries that hold module paths: lists of them, and maps keyed by them
PATH_LISTS = ("target_modules", "target_parameters")
PATH_MAPS = ("rank_pattern", "alpha_pattern")


def model_wrapper(model: nn.Module) -> str | None:
    """The ``model_type`` of the wrapper ``model``'s text model was loaded from, or None."""
    return getattr(getattr(model, "args", None), "wrapper", None)


def _mapped(tensors: dict[str, torch.Tensor], cfg: Any, path: Callable[[str], str]) -> tuple[dict, Any]:
    keys = {(PREFIX + path(k[len(PREFIX) :]) if k.startswith(PREFIX) else path(k)): t for k, t in tensors.items()}
    if not isinstance(cfg, dict):
        return keys, cfg
    out = dict(cfg)
    for key in PATH_LISTS:
        if isinstance(cfg.get(key), list):
            out[key] = [path(p) for p in cfg[key]]
    for key in PATH_MAPS:
        if isinstance(cfg.get(key), dict):
            out[key] = {path(p): v for p, v in cfg[key].items()}
    return keys, out


def to_file(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors (``base_model.model.<path>...`` keys) and ``adapter_config.json`` mapping with the
    wrapper's module paths; unchanged for a model loaded from no wrapper."""
    wrapper = model_wrapper(model)
    return (tensors, cfg) if wrapper is None else _mapped(tensors, cfg, lambda p: wrapped_path(wrapper, p))


def from_file(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of :func:`to_file`: a folder's tensors and config with the text model's paths."""
    wrapper = model_wrapper(model)
    return (tensors, cfg) if wrapper is None else _mapped(tensors, cfg, lambda p: native_path(wrapper, p))
