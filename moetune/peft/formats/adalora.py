"""AdaLoRA adapters in PEFT's own AdaLoRA layout (``peft_type: ADALORA``).

:func:`moetune.save_adapter` writes an AdaLoRA adapter as the equivalent plain LoRA (kept triplets
folded, see :mod:`moetune.peft.adalora.adapters`), which every LoRA reader loads. :func:`save_adalora` writes what
PEFT 0.21's ``AdaLoraModel.save_pretrained`` writes instead, so ``PeftModel.from_pretrained``
rebuilds an AdaLoRA model:

- keys ``base_model.model.<module path>.lora_A`` (k, in), ``.lora_E`` (k, 1), ``.lora_B`` (out, k)
  (no ``.weight``), each cut to the k kept triplets;
- ``rank_pattern`` ``{"<module path>.lora_E": [kept?] * init_r}`` in ``adapter_config.json``
  (PEFT resizes each module to ``sum(pattern)`` while loading, keeping ``ranknum = init_r``);
- the schedule options under PEFT's names (``init_r``, ``target_r``, ``deltaT`` ...);
- moetune's metadata (the original config) in ``moetune_adapter.json`` beside it, as
  :func:`moetune.save_adapter` writes it.

PEFT's AdaLoRA has no routed-expert layer, so an adapter with expert triplets cannot be written
in this layout (use :func:`moetune.save_adapter`, which handles experts).

Reading: :func:`adalora_as_lora` turns such a folder (ours or PEFT's) into its equivalent plain
LoRA, which is how :func:`moetune.load_adapter` loads ``peft_type: ADALORA`` folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterError
from ..adalora.adapters import EPS_RANKNUM, svd_layers
from ..core.inject import adapter_configs
from ..core.targets import logical_modules
from ..lora.experts import LoraGroupedExperts
from .folder import write_adapter_folder
from .peft_config import PREFIX, compact_targets
from .peft_meta import moetune_meta
from .wrapper_paths import to_file


def adalora_tensors(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict[str, list[bool]]]:
    """PEFT AdaLoRA tensors (cut to the kept triplets) and rank pattern of adapter ``name``."""
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    for path, layer in svd_layers(model, name):
        if isinstance(layer, LoraGroupedExperts):
            raise AdapterError(
                f"{path}: PEFT's AdaLoRA layout has no routed-expert layer; write adapter '{name}' "
                "with moetune.save_adapter (plain LoRA, experts included) instead"
            )
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
    }


def save_adalora(model: nn.Module, out_dir: str | os.PathLike, name: str = "default") -> Path:
    """Write AdaLoRA adapter ``name`` in PEFT's AdaLoRA layout (loads with ``PeftModel.from_pretrained``).

    Raises:
        AdapterError: ``name`` is not an AdaLoRA adapter, or it adapts routed experts.
    """
    tensors, pattern = adalora_tensors(model, name)
    cfg = adalora_config(model, name, pattern)  # refuses a name that is not an AdaLoRA adapter
    tensors, cfg = to_file(model, tensors, cfg)  # a multimodal wrapper's module paths, as PEFT sees it
    meta = moetune_meta(adapter_configs(model)[name], name=name, layout="adalora")
    return write_adapter_folder(Path(out_dir), tensors, cfg, meta=meta)


def adalora_as_lora(raw: dict, tensors: dict[str, torch.Tensor], *, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT AdaLoRA folder's config and tensors as the equivalent plain LoRA (what
    :func:`moetune.load_adapter` then reads): per module ``A' = c (Lambda * P)``, ``B' = Q`` at the
    module's kept rank k (rank 0: one zero pair), alpha ``alpha * k / init_r``, so that the
    scaling ``alpha / init_r`` times ``c = init_r / (init_r + 1e-5)`` is PEFT's ``alpha / (ranknum + 1e-5)``."""
    init_r, alpha = raw.get("init_r"), raw.get("lora_alpha", 8)
    if not isinstance(init_r, int) or init_r < 1:
        raise AdapterError(f"{where}: an ADALORA config needs init_r >= 1, got {init_r!r}")
    c = init_r / (init_r + EPS_RANKNUM)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A"):
            continue
        prefix = key.removesuffix("lora_A")
        e, b = tensors.get(prefix + "lora_E"), tensors.get(prefix + "lora_B")
        if e is None or b is None or e.shape != (a.shape[0], 1) or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{where}: '{prefix}lora_E' / 'lora_B' missing or not matching '{key}' {tuple(a.shape)}")
        a2 = (c * e.float() * a.float()) if a.shape[0] else a.new_zeros(1, a.shape[1])
        b2 = b.float() if a.shape[0] else b.new_zeros(b.shape[0], 1)
        out[prefix + "lora_A.weight"], out[prefix + "lora_B.weight"] = a2, b2
        ranks[prefix.removeprefix(PREFIX).rstrip(".")] = a2.shape[0]
    extra = sorted(k for k in tensors if not k.endswith((".lora_A", ".lora_B", ".lora_E")))
    if extra:
        raise AdapterError(f"{where}: tensor '{extra[0]}' is not part of an AdaLoRA triplet")
    skip = {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"}
    cfg = {k: v for k, v in raw.items() if k not in skip}
    cfg.update(
        {
            "peft_type": "LORA",
            "r": init_r,
            "lora_alpha": alpha,
            "rank_pattern": ranks,
            "alpha_pattern": {p: alpha * k / init_r for p, k in ranks.items()},
            "use_rslora": False,
            "use_dora": False,
        }
    )
    return cfg, out
