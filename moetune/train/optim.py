"""AdamW over adapter parameters only, with LoRA+ learning rates, and the LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..peft.base import adapter_layers


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Trainable parameters of adapter ``name`` keyed by ``<module path>.<local name>``."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapter_names:  # adapters with different targets: not every layer has it
            continue
        for local, p in layer.adapter_params(name):
            out[f"{path}.{local}"] = p
    return out


def is_lora_b(key: str) -> bool:
    """LoRA+ scales B matrices; the adapter protocol names them ``lora_B...`` (see peft/base.py)."""
    return key.rsplit(".", 1)[-1].startswith("lora_B") or ".lora_B" in key


def build_optimizer(params: dict[str, nn.Parameter], *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, loraplus_lr_ratio: float | None) -> torch.optim.AdamW:
    """AdamW with fp32 state; with LoRA+ the B matrices get ``lr * loraplus_lr_ratio``."""
    ratio = loraplus_lr_ratio or 1.0
    a = [p for k, p in params.items() if not is_lora_b(k)]
    b = [p for k, p in params.items() if is_lora_b(k)]
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


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind=kind, warmup=warmup, total=total))
