"""Saving and loading adapters: which file format a folder is written in and read as.

``save_adapter`` writes PEFT's format (:mod:`.peft`; routed experts optionally per expert,
:mod:`.per_expert`) for LoRA, DoRA, PiSSA and AdaLoRA adapters (AdaLoRA as its equivalent plain
LoRA), and the mixture layouts (:mod:`.mixtures`: moetune's, or MoE-PEFT's, :mod:`.moe_peft`) for
mixtures of LoRA experts. ``load_adapter`` reads a mixture folder as a mixture and anything else
as PEFT's format (an AdaLoRA-layout folder as its plain LoRA). PEFT's own AdaLoRA layout is
written by :func:`moetune.peft.formats.adalora.save_adalora`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ...errors import AdapterError
from ..core.inject import adapter_configs
from ..core.report import AdapterReport
from ..core.layer import layers_holding
from .mixtures import is_mixture_folder, load_mixture_adapter, save_mixture_adapter
from .peft import add_adapter_from, read_adapter_folder, save_peft

__all__ = ["load_adapter", "save_adapter"]


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    name: str = "default",
    *,
    layout: str = "peft",
    fold_scaling: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``name`` as a PEFT adapter folder.

    Args:
        model: the model carrying the adapter.
        out_dir: destination folder: new, empty, or an adapter folder moetune wrote (replaced);
            anything else is refused (see :mod:`moetune.outputs`).
        name: the adapter to write.
        layout: ``"peft"`` (PEFT's keys; loads with ``PeftModel.from_pretrained``) or
            ``"per_expert"`` (routed experts as 2D per-expert pairs under the family's serving
            names, ``...mlp.experts.{e}.gate_proj.lora_A.weight``, the layout vLLM and SGLang read;
            PEFT refuses it, see :mod:`.per_expert`).
            A mixture of LoRA experts writes moetune's mixture layout for ``"peft"``, or
            MoE-PEFT's MixLoRA layout for ``"moe_peft"`` (see :mod:`.mixtures`).
        fold_scaling: ``"per_expert"`` only: fold each module's scaling into B and write plain
            ``lora_alpha = r`` (for SGLang, which ignores rsLoRA and rank/alpha patterns; :mod:`.fold_scaling`).
        overwrite: write into a non-empty folder moetune did not write, beside its files (never
            replacing or deleting them).

    Returns:
        The folder path.
    """
    config = adapter_configs(model).get(name)
    if layout == "moe_peft" or (config is not None and config.mixture is not None):
        if fold_scaling:
            raise AdapterError("fold_scaling applies to LoRA adapters in the per_expert layout, not to mixtures")
        return save_mixture_adapter(model, out_dir, name, layout=layout, overwrite=overwrite)
    if layout not in ("peft", "per_expert"):
        raise AdapterError(f"layout {layout!r} is not one of 'peft', 'per_expert', 'moe_peft'")
    layers_holding(model, name)  # an unknown name is an error naming the adapters there are
    if config is None:
        raise AdapterError(f"adapter '{name}' was not added with moetune.add_adapter; its config is unknown")
    if fold_scaling and layout != "per_expert":
        raise AdapterError(
            "fold_scaling is for the per_expert layout (servers that ignore rsLoRA and patterns); "
            "PEFT's layout keeps the trained scaling in the config, which PEFT and vLLM read"
        )
    return save_peft(model, out_dir, name, config, layout=layout, fold_scaling=fold_scaling, overwrite=overwrite)


def load_adapter(model: nn.Module, in_dir: str | os.PathLike, name: str = "default") -> AdapterReport:
    """Add adapter ``name`` to ``model`` from a PEFT adapter folder (ours or PEFT's own).

    The config is turned into a :class:`~moetune.LoraConfig`, the adapter is created with
    :func:`~moetune.peft.core.inject.add_adapter` (same targets, base frozen) and filled from the file.
    Nothing is left behind when loading fails.

    Raises:
        AdapterError: unreadable or unsupported folder, a file tensor that maps to no adapted
            module (naming it), a targeted module with no tensors, or a shape mismatch (naming
            the tensor, the expected and the found shape).
    """
    folder = Path(in_dir)
    if is_mixture_folder(folder):  # moetune's mixture layout or MoE-PEFT's MixLoRA
        return load_mixture_adapter(model, folder, name)
    return add_adapter_from(model, read_adapter_folder(folder), name)
