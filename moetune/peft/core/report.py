"""What :func:`~moetune.peft.core.inject.add_adapter` reports: modules and parameters per module group."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .layer import adapter_layers
from .state import AdapterState

__all__ = ["AdapterReport", "ReportRow", "build_report"]

_GROUP = re.compile(r"^(?:.*\.)?layers\.\d+\.")


@dataclass
class ReportRow:
    group: str  # module path without the layer prefix, e.g. "self_attn.q_proj"
    modules: int
    params: int


@dataclass
class AdapterReport:
    """What :func:`add_adapter` adapted: per module group, how many modules and parameters.

    Attributes:
        name: the adapter.
        rows: one row per module group (layer index dropped), in model order.
        trainable: parameters of this adapter.
        total: all parameters of the model, adapters included.
        state: the model's adapter state (configs, AdaLoRA allocators), the one place peft keeps it.
    """

    name: str
    rows: list[ReportRow] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    state: AdapterState | None = field(default=None, repr=False, compare=False)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        width = max([len("module group"), *(len(r.group) for r in self.rows)])
        lines = [
            f"adapter '{self.name}'",
            f"  {'module group':<{width}}  {'modules':>7}  {'trainable':>12}  {'% of model':>10}",
        ]
        for r in self.rows:
            pct = 100.0 * r.params / max(self.total, 1)
            lines.append(f"  {r.group:<{width}}  {r.modules:>7}  {r.params:>12,}  {pct:>9.4f}%")
        lines.append(
            f"  {'total':<{width}}  {sum(r.modules for r in self.rows):>7}  {self.trainable:>12,}  "
            f"{self.percent:>9.4f}%   (of {self.total:,} parameters)"
        )
        return "\n".join(lines)


def build_report(model: nn.Module, name: str, *, state: AdapterState | None = None) -> AdapterReport:
    rows: dict[str, ReportRow] = {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        group = _GROUP.sub("", path)
        row = rows.setdefault(group, ReportRow(group=group, modules=0, params=0))
        row.modules += 1
        row.params += sum(p.numel() for _, p in layer.adapter_params(name))
    total = sum(p.numel() for p in model.parameters())
    return AdapterReport(
        name=name, rows=list(rows.values()), trainable=sum(r.params for r in rows.values()), total=total, state=state
    )
