"""AdaLoRA adapters in PEFT's own AdaLoRA layout (``peft_type: ADALORA``).

:func:`moetune.save_adapter` writes an AdaLoRA adapter as the equivalent plain LoRA (kept triplets
folded, see :mod:`.adalora`), which every LoRA reader loads. :func:`save_adalora` writes what
PEFT 0.21's ``AdaLoraModel.save_pretrained`` writes instead, so ``PeftModel.from_pretrained``
rebuilds an AdaLoRA model:

- keys ``base_model.model.<module path>.lora_A`` (k, in), ``.lora_E`` (k, 1), ``.lora_B`` (out, k)
  (no ``.weight``), each cut to the k kept triplets;
- ``rank_pattern`` ``{"<module path>.lora_E": [kept?] * init_r}`` in ``adapter_config.json``
  (PEFT resizes each module to ``sum(pattern)`` while loading, keeping ``ranknum = init_r``);
- the schedule options under PEFT's names (``init_r``, ``target_r``, ``deltaT`` ...).

PEFT's AdaLoRA has no routed-expert layer, so an adapter with expert triplets cannot be written
in this layout (use :func:`moetune.save_adapter`, which handles experts).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from .adalora import SVDExpertsMixin, svd_layers
from .inject import adapter_configs, logical_modules
from .io import _write
from .peft_format import PREFIX, compact_targets


def adalora_tensors(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict[str, list[bool]]]:
    """PEFT AdaLoRA tensors (cut to the kept triplets) and rank pattern of adapter ``name``."""
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    for path, layer in svd_layers(model, name):
        if isinstance(layer, SVDExpertsMixin):
            raise AdapterError(f"{path}: PEFT's AdaLoRA layout has no routed-expert layer; write adapter '{name}' "
                               "with moetune.save_adapter (plain LoRA, experts included) instead")
        keep = layer.rank_mask.get(name)
        a, e, b = (t.detach().to("cpu", torch.float32) for t in layer.svd_triplets(name)[name])
        keep_cpu = keep.cpu()
        tensors[f"{PREFIX}{path}.lora_A"] = a[keep_cpu].contiguous()
        tensors[f"{PREFIX}{path}.lora_E"] = e[keep_cpu].contiguous()
        tensors[f"{PREFIX}{path}.lora_B"] = b[:, keep_cpu].contiguous()
        pattern[f"{path}.lora_E"] = keep.tolist()
    if not pattern:
        raise AdapterError(f"no AdaLoRA adapter named '{name}' in this model")
    return tensors, pattern


def adalora_config(model: nn.Module, name: str, pattern: dict[str, list[bool]]) -> dict:
    """``adapter_config.json`` for :func:`save_adalora` (PEFT's AdaLoraConfig fields)."""
    config = adapter_configs(model).get(name)
    if config is None or config.adalora is None:
        raise AdapterError(f"adapter '{name}' was not added as an AdaLoRA adapter (LoraConfig.adalora)")
    ada = config.adalora
    paths = [key.removesuffix(".lora_E") for key in pattern]
    return {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "source_path", None),
        "init_r": config.r,
        "target_r": ada.target_r,
        "tinit": ada.tinit,
        "tfinal": ada.tfinal,
        "deltaT": ada.delta_t,
        "beta1": ada.beta1,
        "beta2": ada.beta2,
        "orth_reg_weight": ada.orth_reg_weight,
        "total_step": ada.total_step,
        "rank_pattern": pattern,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": compact_targets(paths, [p for p, _ in logical_modules(model) if p]),
        "layers_to_transform": config.layers_to_transform,
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "moetune": {"adapter_name": name, "layout": "adalora", "lora_config": config.to_dict()},
    }


def save_adalora(model: nn.Module, out_dir: str | os.PathLike, name: str = "default") -> Path:
    """Write AdaLoRA adapter ``name`` in PEFT's AdaLoRA layout (loads with ``PeftModel.from_pretrained``).

    Raises:
        AdapterError: ``name`` is not an AdaLoRA adapter, or it adapts routed experts.
    """
    tensors, pattern = adalora_tensors(model, name)
    return _write(Path(out_dir), tensors, adalora_config(model, name, pattern))
