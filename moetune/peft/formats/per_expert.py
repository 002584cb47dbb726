"""The per-expert serving layout (what vLLM and SGLang read) of routed-expert adapters.

Routed experts are written as 2D pairs per expert and projection,
``<experts>.{e}.gate_proj.lora_A.weight`` (r, D) / ``...lora_B.weight`` (F, r) (the tensors come
from :func:`moetune.peft.lora.experts_layout.per_expert_tensors`), and ``target_modules`` names
the projections (``gate_proj``, ``up_proj``, ``down_proj``); linears keep PEFT's keys. The writer
is :func:`moetune.peft.formats.peft.save_peft` with ``layout="per_expert"``; reading is automatic
(:func:`is_per_expert_part`).
"""

from __future__ import annotations

import re

import torch

from ...errors import AdapterError
from ..core.layer import AdapterLayer
from ..lora.experts import LoraGroupedExperts

__all__ = ["is_per_expert_part", "load_part", "per_expert_part"]

_PER_EXPERT_KEY = re.compile(r"^(\d+)\.(\w+)\.lora_[AB]\.weight$")


def per_expert_part(layer: AdapterLayer, path: str, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A routed-experts layer's tensors in this layout and the projections they name."""
    if not isinstance(layer, LoraGroupedExperts):
        raise AdapterError(f"{path}: {type(layer).__name__} cannot write the per_expert layout")
    part = layer.per_expert_tensors(name)
    return part, [m.group(2) for k in part if (m := _PER_EXPERT_KEY.match(k))]


def is_per_expert_part(layer: AdapterLayer, part: dict[str, torch.Tensor]) -> bool:
    """Whether one layer's file tensors are in this layout (a routed-experts layer, per-expert keys)."""
    return isinstance(layer, LoraGroupedExperts) and all(_PER_EXPERT_KEY.match(k) for k in part)


def load_part(layer: AdapterLayer, name: str, part: dict[str, torch.Tensor], *, where: str) -> None:
    """Fill adapter ``name`` of ``layer`` from its tensors, in this layout or PEFT's."""
    if is_per_expert_part(layer, part):
        layer.load_per_expert_tensors(name, part, where=where)
    else:
        layer.load_peft_tensors(name, part, where=where)
