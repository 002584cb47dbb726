"""AdamW over adapter parameters only, with LoRA+ learning rates, and the LR schedules."""

from __future__ import annotations

import math
from typing import Collection

import torch
from torch import nn

from ..peft.core.params import AdapterParams


def build_optimizer(
    params: dict[str, nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    loraplus_lr_ratio: float | None,
    b_side: Collection[str] | None = None,
) -> torch.optim.AdamW:
    """AdamW with fp32 state; with LoRA+ the B matrices get ``lr * loraplus_lr_ratio``.

    Args:
        params: from :func:`adapter_parameters` (which knows the B side of every adapter kind).
        b_side: the keys of ``params`` that are B matrices; default: ``params.b_side``.

    Raises:
        ValueError: LoRA+ asked for on a plain dict with no ``b_side``.
    """
    ratio = loraplus_lr_ratio or 1.0
    b_keys = set(b_side if b_side is not None else getattr(params, "b_side", ()))
    if ratio != 1.0 and b_side is None and not isinstance(params, AdapterParams):
        raise ValueError(
            "build_optimizer: loraplus_lr_ratio needs to know the B matrices; pass b_side= "
            "or the parameters from adapter_parameters()"
        )
    a = [p for k, p in params.items() if k not in b_keys]
    b = [p for k, p in params.items() if k in b_keys]
    groups = [g for g in ({"params": a, "lr": lr}, {"params": b, "lr": lr * ratio}) if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, foreach=False)


def lr_factor(step: int, *, kind: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step`` (0-based): linear warmup, then cosine/linear/constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind=kind, warmup=warmup, total=total))
