"""Router losses and statistics of adapter mixtures, read from a forward's ``records``.

Every mixture router reports a :class:`~.router.MixtureRecord` per adapter and forward (see
:class:`~moetune.peft.core.context.AdapterContext`). The trainer adds :func:`adapter_router_loss` of
each adapter to that adapter's loss; metrics and ``moetune eval`` show :func:`mixture_metrics`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .router import MixtureRecord


def _records(records: dict, name: str | None) -> list[MixtureRecord]:
    return [r for r in records.values() if isinstance(r, MixtureRecord) and (name is None or r.adapter == name)]


def adapter_router_loss(records: dict, name: str | None = None) -> torch.Tensor | None:
    """Adapter ``name``'s router losses (each with its coefficient), averaged over its routers;
    None when it has no router in this forward. ``name=None`` pools every adapter's routers."""
    mine = _records(records, name)
    if not mine:
        return None
    return torch.stack([r.loss() for r in mine]).sum() / len(mine)


def adapter_names_with_routers(records: dict) -> list[str]:
    return list(dict.fromkeys(r.adapter for r in _records(records, None)))


def mixture_metrics(model: nn.Module, records: dict) -> dict[str, dict[str, list]]:
    """Per adapter, per router (in forward order): module path, share of routed tokens per expert,
    max load relative to uniform (1.0 = balanced), mean routing entropy (nats), dropped tokens."""
    paths = {id(m): p for p, m in model.named_modules()}
    out: dict[str, dict[str, list]] = {}
    for key, record in records.items():
        if not isinstance(record, MixtureRecord):
            continue
        s = record.stats
        counts = s.counts.detach().float()
        share = counts / counts.sum().clamp_min(1e-12)
        tokens = max(float(s.tokens), 1.0)
        entry = out.setdefault(
            record.adapter,
            {"layers": [], "expert_load": [], "router_max_load": [], "router_entropy": [], "dropped": []},
        )
        entry["layers"].append(paths.get(key[0], "?") if isinstance(key, tuple) else str(key))
        entry["expert_load"].append([round(float(v), 4) for v in share])
        entry["router_max_load"].append(round(float(share.max()) * counts.numel(), 4))
        entry["router_entropy"].append(round(float(s.entropy_sum) / tokens, 4))
        entry["dropped"].append(int(s.dropped))
    return out


def merge_metrics(total: dict, part: dict, weight: float = 1.0) -> dict:
    """Accumulate :func:`mixture_metrics` over batches (sums of weighted values; see :func:`mean_metrics`)."""
    for name, entry in part.items():
        acc = total.setdefault(name, {"layers": entry["layers"], "weight": 0.0, "sums": None})
        values = [entry["expert_load"], entry["router_max_load"], entry["router_entropy"], entry["dropped"]]
        flat = (
            [[w * weight for w in row] for row in values[0]],
            [v * weight for v in values[1]],
            [v * weight for v in values[2]],
            [v * weight for v in values[3]],
        )
        if acc["sums"] is None:
            acc["sums"] = flat
        else:
            acc["sums"] = (
                [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(acc["sums"][0], flat[0])],
                *([a + b for a, b in zip(sa, sb)] for sa, sb in zip(acc["sums"][1:], flat[1:])),
            )
        acc["weight"] += weight
    return total


def mean_metrics(total: dict) -> dict[str, dict[str, list]]:
    out = {}
    for name, acc in total.items():
        w = max(acc["weight"], 1e-12)
        load, max_load, entropy, dropped = acc["sums"]
        out[name] = {
            "layers": acc["layers"],
            "expert_load": [[round(v / w, 4) for v in row] for row in load],
            "router_max_load": [round(v / w, 4) for v in max_load],
            "router_entropy": [round(v / w, 4) for v in entropy],
            "dropped": [round(v / w, 2) for v in dropped],
        }
    return out


def format_metrics(metrics: dict[str, dict[str, list]]) -> str:
    """Human-readable lines for ``moetune eval``."""
    lines = []
    for name, entry in metrics.items():
        lines.append(f"adapter '{name}' routers (expert load shares, max load vs uniform, entropy in nats):")
        for path, load, top, h in zip(
            entry["layers"], entry["expert_load"], entry["router_max_load"], entry["router_entropy"]
        ):
            ceiling = math.log(max(len(load), 1))
            lines.append(
                f"  {path}: load [{' '.join(f'{v:.2f}' for v in load)}]  max {top:.2f}  "
                f"entropy {h:.3f} (max {ceiling:.3f})"
            )
    return "\n".join(lines)
