"""Plain references for the mixture layers: a Python loop over experts, each expert a full copy
of the frozen layer with its own LoRA (no shared ``W1 x``, no grouped GEMM, direct DoRA norms).

Dropout masks are taken from a :class:`RecordingDropout` that ran in the fast path: the input
mask is per token; the down-projection mask is per routed row, in the canonical order (expert by
expert, tokens ascending), which is the order a loop over experts visits the rows in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RecordingDropout(nn.Module):
    """Inverted dropout that keeps every mask it drew (to replay them in a reference)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.masks = p, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (torch.rand_like(x) >= self.p).to(x.dtype) / (1 - self.p)
        self.masks.append(mask)
        return x * mask


def reference_routing(x: torch.Tensor, weight: torch.Tensor, mix) -> tuple[list[list[tuple[int, float]]], torch.Tensor]:
    """Per token, its (expert, weight) list in slot order, and (N,) the frozen FFN's weight."""
    probs = torch.softmax(x.float() @ weight.float().t(), dim=-1)
    N, E = probs.shape
    choices, base = [], torch.zeros(N)
    if mix.routing == "switch":
        capacity, used = math.ceil(mix.capacity_factor * N / E), [0] * E
        for t in range(N):
            p, e = probs[t].max(0)
            if used[int(e)] < capacity:
                used[int(e)] += 1
                choices.append([(int(e), p)])
                base[t] = 1 - p
            else:
                choices.append([])
                base[t] = 1.0
        return choices, base
    for t in range(N):
        if mix.routing == "top_k":
            top, idx = torch.topk(probs[t], mix.top_k)
            top = top / top.sum()
        elif mix.routing == "top_p":
            s, order = probs[t].sort(descending=True)
            keep = (s.cumsum(0) - s) < mix.top_p
            top, idx = s[keep] / s[keep].sum(), order[keep]
        else:
            top, idx = probs[t], torch.arange(E)
        choices.append([(int(e), w) for e, w in zip(idx, top)])
    return choices, base


def _lora_proj(layer, name, proj, e, x, xd, weight):
    """Expert e's projection: ``W x`` plus LoRA, or PEFT's DoRA with a direct norm."""
    short = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}[proj]
    if name not in getattr(layer, f"lora_A_{short}"):
        return F.linear(x, weight)
    s = layer.options[name].scaling
    a, b = getattr(layer, f"lora_A_{short}")[name][e], getattr(layer, f"lora_B_{short}")[name][e]
    lora = s * F.linear(F.linear(xd, a), b)
    mags = getattr(layer, f"lora_magnitude_{short}")
    if name not in mags:
        return F.linear(x, weight) + lora
    factor = mags[name][e] / torch.linalg.norm(weight + s * b @ a, dim=1).detach()
    return F.linear(x, weight) + (factor - 1) * F.linear(xd, weight) + factor * lora


def reference_mixlora(layer, name: str, x: torch.Tensor, drop: RecordingDropout | None) -> torch.Tensor:
    """MixLoRA by the definition: x (N, D) -> (N, D)."""
    w1, w3, w2 = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    mix = layer.mixtures[name].mixture
    choices, base = reference_routing(x, layer.router[name], mix)
    x_mask = drop.masks[0] if drop else torch.ones_like(x)
    h_masks = iter(drop.masks[1]) if drop and len(drop.masks) > 1 else None
    outs = [torch.zeros(x.shape[1]) for _ in range(x.shape[0])]
    for e in range(layer.router[name].shape[0]):
        for t, slots in enumerate(choices):
            for expert, w in slots:
                if expert != e:
                    continue
                xt, xd = x[t], x[t] * x_mask[t]
                g = _lora_proj(layer, name, "gate_proj", e, xt, xd, w1)
                u = _lora_proj(layer, name, "up_proj", e, xt, xd, w3)
                h = layer.act(g) * u
                hd = h * next(h_masks) if h_masks is not None else h
                outs[t] = outs[t] + w * _lora_proj(layer, name, "down_proj", e, h, hd, w2)
    out = torch.stack(outs)
    if mix.routing == "switch":
        out = out + base[:, None] * F.linear(layer.act(F.linear(x, w1)) * F.linear(x, w3), w2)
    return out


def reference_mixture_linear(layer, name: str, x: torch.Tensor, drop: RecordingDropout | None) -> torch.Tensor:
    """MoLA / LoRAMoE by the definition: ``W x + sum_e w_e s B_e A_e x'``; x (N, in) -> (N, out)."""
    mix = layer.mixtures[name].mixture
    choices, _ = reference_routing(x, layer.router[name], mix)
    xd = x * drop.masks[0] if drop else x
    s = layer.options[name].scaling
    rows = []
    for t, slots in enumerate(choices):
        y = F.linear(x[t], layer.base_layer.weight, layer.base_layer.bias)
        for e, w in slots:
            y = y + w * s * F.linear(F.linear(xd[t], layer.moe_lora_A[name][e]), layer.moe_lora_B[name][e])
        rows.append(y)
    return torch.stack(rows)
