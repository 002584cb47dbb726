"""Folding each module's LoRA scaling into B, for readers that scale every module by ``lora_alpha / r``.

SGLang (0.5.23, ``LoRAAdapter.__init__``: ``scaling = lora_alpha / r``; ``mem_pool``: every module
copied at rank ``r``) ignores ``use_rslora``, ``rank_pattern`` and ``alpha_pattern``. A folder
written for it holds ``s * B`` for each module's true scaling ``s`` (alpha/r, alpha/sqrt(r) with
rsLoRA, its pattern entries), every pair zero-padded to the largest rank R (zero rows of A and
columns of B add nothing), and ``r = lora_alpha = R`` with no patterns and no rsLoRA: any reader
computes the trained delta. DoRA magnitudes are unchanged (DoRA normalises ``W + s B A``, the same
matrix).
"""

from __future__ import annotations

import math
import re

import torch

from ...errors import AdapterError

__all__ = ["fold_into_b", "peft_rank_scaling"]

_A, _B = ".lora_A.weight", ".lora_B.weight"


def _pattern(pattern: dict, name: str):
    """PEFT's ``get_pattern_key`` rule (vLLM's ``PEFTHelper._match_pattern`` too): the first key
    matching the end of ``name`` at a dot boundary."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def peft_rank_scaling(cfg: dict, module: str) -> tuple[int, float]:
    """(rank, scaling) a PEFT-rule reader gives ``module`` (path without ``base_model.model.``)."""
    rank = _pattern(cfg.get("rank_pattern") or {}, module) or cfg["r"]
    alpha = _pattern(cfg.get("alpha_pattern") or {}, module) or cfg["lora_alpha"]
    return rank, alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def fold_into_b(tensors: dict[str, torch.Tensor], cfg: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``tensors`` (PEFT keys, 2D pairs) and ``cfg`` with the scaling folded into B (see above)."""
    if cfg.get("target_parameters"):
        raise AdapterError(
            "fold_scaling needs 2D pairs per module; PEFT's target_parameters layout is read by PEFT and vLLM "
            "with its patterns already (use the per_expert layout for servers that ignore them)"
        )
    modules = [k[: -len(_A)] for k in tensors if k.endswith(_A)]
    top = max(tensors[m + _A].shape[0] for m in modules)
    out = dict(tensors)
    for m in modules:
        a, b = tensors[m + _A], tensors[m + _B]
        _, s = peft_rank_scaling(cfg, m.removeprefix("base_model.model."))
        pad = top - a.shape[0]
        out[m + _A] = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        out[m + _B] = torch.cat([b * s, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    flat = {"r": top, "lora_alpha": top, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    return out, {**cfg, **flat}
