"""Structural facts about a model: family, layer and expert counts, total and active parameters.

Built from ``config.json`` alone on the meta device, so it is instant even for a 600B model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .build import build_causal_lm
from .config import ModelArgs
from .moe import GroupedExperts


@dataclass
class ModelSummary:
    family: str
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    shared_experts: bool
    total_params: int
    active_params: int
    vocab_size: int
    hidden_size: int
    attention: str = ""  # what differs from full causal attention (sliding windows, sinks); "" when nothing

    def lines(self) -> list[str]:
        out = [
            f"family            {self.family}",
            f"layers            {self.num_layers} ({self.moe_layers} MoE, {self.num_layers - self.moe_layers} dense "
            "FFN)",
            f"hidden / vocab    {self.hidden_size} / {self.vocab_size}",
        ]
        if self.attention:
            out.append(f"attention         {self.attention}")
        if self.moe_layers:
            out.append(
                f"experts           {self.num_experts} routed, top-{self.top_k}"
                + (", plus shared expert(s)" if self.shared_experts else "")
            )
        out += [
            f"parameters        {self.total_params:,} total ({_human(self.total_params)})",
            f"active per token  {self.active_params:,} ({_human(self.active_params)})",
        ]
        return out


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): routed experts count top_k / E of their parameters."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            n = sum(p.numel() for p in module.parameters(recurse=False))
            top_k = getattr(model, "args").moe.top_k
            inactive += n * (1 - top_k / module.num_experts)
    return total, int(round(total - inactive))


def summarize(args: ModelArgs) -> ModelSummary:
    with torch.device("meta"):
        model = build_causal_lm(args)
    total, active = count_parameters(model)
    moe = args.moe
    return ModelSummary(
        family=args.family,
        num_layers=args.num_layers,
        moe_layers=sum(args.is_moe_layer(i) for i in range(args.num_layers)),
        num_experts=moe.num_experts if moe else 0,
        top_k=moe.top_k if moe else 0,
        shared_experts=bool(moe and moe.shared_intermediate_size),
        total_params=total,
        active_params=active,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        attention=_attention(args, model),
    )


def _attention(args: ModelArgs, model: nn.Module) -> str:
    """'sliding window 128 on 12 of 24 layers, learned sinks' (only the parts that apply)."""
    parts = []
    windows = [w for w in args.sliding_window if w is not None]
    if windows:
        sizes = "/".join(str(w) for w in sorted(set(windows)))
        parts.append(f"sliding window {sizes} on {len(windows)} of {args.num_layers} layers")
    if any(name.endswith(".sinks") for name, _ in model.named_parameters()):
        parts.append("learned sinks")
    linear = sum(args.is_linear_attention_layer(i) for i in range(args.num_layers))
    if linear:
        parts.append(f"gated DeltaNet on {linear} of {args.num_layers} layers, gated full attention on the rest")
    return ", ".join(parts)
