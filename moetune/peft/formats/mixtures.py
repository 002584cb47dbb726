"""Adapter folders of mixtures of LoRA experts: moetune's layout and MoE-PEFT's MixLoRA layout.

moetune's layout (docs/mixlora.md): ``adapter_config.json`` with ``peft_type: MOETUNE_MIXTURE``
and the adapter's full ``lora_config`` (mixture included); ``adapter_model.safetensors`` with
keys ``base_model.model.<module path>.<suffix>``: a MixLoRA FFN writes ``router.weight`` (E, D)
and ``{proj}.experts.lora_A.weight`` (E, r, in) / ``.lora_B.weight`` (E, out, r) /
``.lora_magnitude_vector`` (E, out); a MoLA/LoRAMoE linear ``router.weight`` and
``experts.lora_{A,B}.weight``; plain LoRA targets (attention) PEFT's keys. Module paths are the
ones PEFT's layout writes (a multimodal wrapper's: :mod:`.wrapper_paths`).

MoE-PEFT's layout (``layout="moe_peft"``, read automatically): ``peft_type: MIXLORA`` with
``routing_strategy``, ``num_experts``, ``top_k``/``top_p``, optional ``expert_lora``; keys
``mixlora.layers.{l}.mlp.moe_gate.weight``, ``mixlora.layers.{l}.mlp.{proj}.experts.{i}.lora_{A,B}.weight``
and ``mixlora.layers.{l}.self_attn.{proj}.lora_{A,B}.weight`` (proj names as in Hugging Face
LLaMA: gate_proj, up_proj, down_proj - MoE-PEFT's ``LlamaMLP.state_dict``). MoE-PEFT writes
``adapter_model.bin`` (a pickle) and reads nothing else: moetune's export writes it beside
``adapter_model.safetensors`` (same tensors, :mod:`.moe_peft`); moetune reads the safetensors file only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ...config import LoraConfig, from_dict
from ...errors import AdapterError, ConfigError
from ..core.inject import adapter_configs, add_adapter, delete_adapter
from ..core.layer import adapter_layers
from ..core.report import AdapterReport
from . import moe_peft
from .folder import CONFIG_FILE, WEIGHTS_FILE, read_json, read_tensors, write_adapter_folder
from .peft import fill_adapter
from .peft_config import PREFIX
from .wrapper_paths import from_file, to_file

MOETUNE_TYPE = "MOETUNE_MIXTURE"
MIXTURE_TYPES = (MOETUNE_TYPE, moe_peft.PEFT_TYPE)
FORMAT_VERSION = 1


def folder_peft_type(folder: str | os.PathLike) -> str | None:
    """The ``peft_type`` in a folder's ``adapter_config.json``; None when there is none to read
    (the loader then says what is wrong with the folder)."""
    cfg = Path(folder) / CONFIG_FILE
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    kind = raw.get("peft_type") if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else None


def is_mixture_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a mixture adapter (moetune's or MoE-PEFT's)."""
    return folder_peft_type(folder) in MIXTURE_TYPES


def not_a_mixture(what: str) -> str:
    """Why MoE-PEFT's layout refuses a LoRA adapter (``what`` names it), and what to use instead."""
    return (
        f"{what} is a LoRA adapter, not a mixture: --for moe_peft writes MoE-PEFT's MixLoRA layout, which "
        "holds MixLoRA adapters (mixtures of LoRA experts) only; export a LoRA adapter with --for peft, vllm or sglang"
    )


def save_mixture_adapter(
    model: nn.Module, out_dir: str | os.PathLike, name: str, *, layout: str, overwrite: bool = False
) -> Path:
    """Write adapter ``name`` in moetune's mixture layout (``layout="peft"``) or MoE-PEFT's
    (``layout="moe_peft"``)."""
    config = adapter_configs(model).get(name)
    if config is None:
        raise AdapterError(f"adapter '{name}' was not added with moetune.add_adapter; its config is unknown")
    if layout == "moe_peft" and config.mixture is None:
        raise AdapterError(not_a_mixture(f"adapter '{name}'"))
    parts = {path: layer.peft_tensors(name) for path, layer in adapter_layers(model) if name in layer.adapter_names}
    if layout == "moe_peft":
        tensors, cfg = moe_peft.export(model, config, parts)
    elif layout == "peft":
        tensors = {f"{PREFIX}{path}.{suffix}": t for path, part in parts.items() for suffix, t in part.items()}
        tensors, _ = to_file(model, tensors, None)  # a multimodal wrapper's module paths, as PEFT's layout
        cfg = {
            "peft_type": MOETUNE_TYPE,
            "format_version": FORMAT_VERSION,
            "adapter_name": name,
            "base_model_name_or_path": getattr(model, "source_path", None),
            "lora_config": config.to_dict(),
        }
    else:
        raise AdapterError(
            f"layout {layout!r} is not one of 'peft' (moetune's mixture layout), 'moe_peft' for a "
            f"mixture adapter ('{name}' is {config.mixture.kind})"
        )
    tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in tensors.items()}
    return write_adapter_folder(Path(out_dir), tensors, cfg, overwrite=overwrite, pickle_copy=layout == "moe_peft")


def load_mixture_adapter(model: nn.Module, folder: Path, name: str) -> AdapterReport:
    """Add adapter ``name`` from a mixture folder (moetune's or MoE-PEFT's layout)."""
    cfg_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    raw = read_json(cfg_file)
    if not weights.is_file():
        raise AdapterError(_missing_weights(folder))
    tensors = read_tensors(weights)
    if raw["peft_type"] == moe_peft.PEFT_TYPE:
        config = moe_peft.config_from_file(
            raw, str(cfg_file), hidden_act=getattr(getattr(model, "args", None), "hidden_act", None)
        )
        tensors = moe_peft.import_tensors(tensors, str(weights), config)
    else:
        config = _our_config(raw, str(cfg_file))
        tensors, _ = from_file(model, tensors, None)
    try:
        report = add_adapter(model, config, name)
    except AdapterError as err:
        raise AdapterError(f"{cfg_file}: {err}") from None
    try:
        fill_adapter(model, name, tensors, weights)
    except BaseException:
        delete_adapter(model, name)
        raise
    return report


def _our_config(raw: dict, where: str) -> LoraConfig:
    if raw.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{where}: format_version {raw.get('format_version')!r} is not supported (this moetune reads "
            f"{FORMAT_VERSION})"
        )
    try:
        return from_dict(LoraConfig, raw.get("lora_config"), where=f"{where}: lora_config")
    except ConfigError as err:
        raise AdapterError(str(err)) from None


def _missing_weights(folder: Path) -> str:
    if (folder / "adapter_model.bin").is_file():
        return (
            f"'{folder}' holds adapter_model.bin (a pickle, as MoE-PEFT writes); moetune reads safetensors only, "
            'because unpickling can run arbitrary code. If you trust the file, convert it once: python -c "import '
            "torch; "
            "from safetensors.torch import save_file; save_file(torch.load('adapter_model.bin', weights_only=True), "
            "'adapter_model.safetensors')\" in that folder"
        )
    return f"'{folder}' has no {WEIGHTS_FILE}"
