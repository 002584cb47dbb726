"""AdamW over adapter parameters only, with LoRA+ learning rates, and the LR schedules.

A resumed run loads its optimizer and scheduler state from the checkpoint, hyperparameters included;
:func:`follow_settings` then puts the config's back (``--resume optim.max_steps=... optim.lr=...``).
"""

from __future__ import annotations

import math
from typing import Any, Collection

import torch
from torch import nn

from ..config import OptimSection
from ..peft.core.params import AdapterParams

# The optim keys that live in the optimizer's and scheduler's state (the others are read every step)
STATE_KEYS = ("lr", "loraplus_lr_ratio", "weight_decay", "betas", "eps", "lr_schedule", "warmup_steps", "max_steps")


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


def optimizer_for(params: dict[str, nn.Parameter], optim: OptimSection) -> torch.optim.AdamW:
    """:func:`build_optimizer` as ``optim`` says."""
    return build_optimizer(
        params,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=tuple(optim.betas),
        eps=optim.eps,
        loraplus_lr_ratio=optim.loraplus_lr_ratio,
    )


def scheduler_for(optimizer: torch.optim.Optimizer, optim: OptimSection) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`build_scheduler` as ``optim`` says."""
    return build_scheduler(optimizer, kind=optim.lr_schedule, warmup=optim.warmup_steps, total=optim.max_steps)


def state_settings(optim: OptimSection) -> dict[str, Any]:
    """The :data:`STATE_KEYS` of ``optim`` as plain JSON values (recorded in checkpoints)."""
    values = {k: getattr(optim, k) for k in STATE_KEYS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def follow_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    params: dict[str, nn.Parameter],
    optim: OptimSection,
) -> None:
    """Give an optimizer and scheduler loaded from a checkpoint the hyperparameters of ``optim`` and
    the lr its schedule has at the scheduler's step; Adam's moments and the step count are kept.

    ``scheduler`` must have been built by :func:`scheduler_for` with ``optim``: a loaded state keeps
    the schedule's function but not its base lrs. With the settings the checkpoint was trained with,
    every value is recomputed as it was, so an unchanged resume stays bitwise identical.
    """
    fresh = optimizer_for(params, optim)  # its groups line up with the loaded ones: same params, same order
    for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        for key in ("initial_lr", "weight_decay", "betas", "eps"):
            group[key] = new[key]
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler.last_epoch -= 1
    scheduler.step()  # public way to set each group's lr (and get_last_lr) to base lr x factor(step)
