"""Routers inside single linears: MoLA (top-k, every targeted linear) and LoRAMoE (dense soft
mixture on the FFN projections).

Legend: N tokens of the call, N_a tokens one adapter routes, R routed rows (sorted by expert),
in/out the linear's features, E experts, r expert rank, s expert scaling.

A mixture adapter adds ``sum_e w_e s B_e A_e x'`` to the frozen ``W x`` (``x'`` = dropout(x), one
mask per token shared by its experts). Sparse routing (``top_k``, ``top_p``) runs the pairs as
grouped GEMMs on expert-sorted rows; ``dense`` routing is one GEMM with all experts' A stacked
(rank E*r), the per-expert weights applied to the rank dimension, and one GEMM with B stacked -
the soft mixture of E LoRAs is a rank-E*r LoRA with per-token scales.

:class:`MixtureLinear` is a :class:`~moetune.peft.lora.LoraLinear`, so plain LoRA adapters live
beside the mixtures on the same linear (and keep PEFT's file layout).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError
from ...model.grouped import grouped_linear
from ...model.moe import combine, dispatch
from ..core.layer import AdapterLayer
from ..lora.linear import LoraLinear
from .common import ExpertOptions, MixtureMixin, check_tensors, new_expert_pair, new_router, require_mixture


class MixtureLinear(MixtureMixin, LoraLinear):
    """An ``nn.Linear`` with named LoRA adapters and named mixture-of-LoRA-experts adapters."""

    b_side = (*LoraLinear.b_side, "moe_lora_B")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self._init_mixtures()

    def _init_mixtures(self) -> None:
        self.router = nn.ParameterDict()  # name -> (E, in) fp32
        self.moe_lora_A = nn.ParameterDict()  # name -> (E, r, in)
        self.moe_lora_B = nn.ParameterDict()  # name -> (E, out, r)
        self.moe_dropout = nn.ModuleDict()
        self.mixtures: dict[str, LoraConfig] = {}
        self.options: dict[str, ExpertOptions] = {}

    @classmethod
    def adopt(cls, layer: AdapterLayer) -> MixtureLinear:
        """Turn a plain :class:`LoraLinear` (already holding LoRA adapters) into a MixtureLinear in
        place, keeping its adapters; the class swap only adds empty mixture containers."""
        if type(layer) is not LoraLinear:
            raise AdapterError(f"cannot add a mixture adapter to a {type(layer).__name__} (4-bit bases take plain LoRA only)")
        layer.__class__ = cls
        layer._init_mixtures()
        return layer

    # --- protocol -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys()) + list(self.mixtures)

    def add_adapter(self, name: str, config: LoraConfig, *, parts: set[str] | None = None) -> None:
        if config.mixture is None:
            return super().add_adapter(name, config, parts=parts)
        mix = require_mixture(config, "MixtureLinear.add_adapter")
        if name in self.adapter_names:
            raise AdapterError(f"adapter '{name}' already exists on this layer")
        if config.use_dora:
            raise AdapterError(f"adapter '{name}': DoRA experts exist for mixlora (MixDoRA) only, not for {mix.kind}")
        opts = ExpertOptions.of(config)
        device = self.base_layer.weight.device
        self.router[name] = new_router(mix.num_experts, self.in_features, mix.router_init_std, device)
        self.moe_lora_A[name], self.moe_lora_B[name] = new_expert_pair(
            mix.num_experts, opts.rank, self.in_features, self.out_features, opts.init, device)
        self.moe_dropout[name] = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()
        self.mixtures[name], self.options[name] = config, opts
        if not self.active:
            self.active.append(name)

    def delete_adapter(self, name: str) -> None:
        if name not in self.mixtures:
            return super().delete_adapter(name)
        for store in (self.router, self.moe_lora_A, self.moe_lora_B, self.moe_dropout):
            del store[name]
        self.mixtures.pop(name)
        self.options.pop(name)
        self.active = [n for n in self.active if n != name]

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        plain = [n for n in ([name] if name is not None else self.adapter_names) if n not in self.mixtures]
        for n in plain:
            yield from super().adapter_params(n)
        for n in [name] if name is not None else list(self.mixtures):
            if n in self.mixtures:
                yield f"router.{n}", self.router[n]
                yield f"moe_lora_A.{n}", self.moe_lora_A[n]
                yield f"moe_lora_B.{n}", self.moe_lora_B[n]

    def merge(self, name: str) -> None:
        if name in self.mixtures:
            self.refuse_merge(name)
        if type(self.base_layer) is not nn.Linear:
            raise AdapterError(f"cannot merge adapter '{name}' into a {type(self.base_layer).__name__} base")
        super().merge(name)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Plain adapters: PEFT's keys. Mixtures: ``router.weight`` (E, in),
        ``experts.lora_A.weight`` (E, r, in), ``experts.lora_B.weight`` (E, out, r)."""
        if name not in self.mixtures:
            return super().peft_tensors(name)
        return {"router.weight": self.router[name].detach(), "experts.lora_A.weight": self.moe_lora_A[name].detach(),
                "experts.lora_B.weight": self.moe_lora_B[name].detach()}

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        if name not in self.mixtures:
            return super().load_peft_tensors(name, tensors, where=where)
        own = self.peft_tensors(name)
        check_tensors({k: tuple(v.shape) for k, v in own.items()}, tensors, where)
        with torch.no_grad():
            for key, t in own.items():
                t.copy_(tensors[key])

    def running(self) -> list[str]:
        """Plain LoRA adapters that run (what :meth:`LoraLinear.forward` adds)."""
        return [n for n in AdapterLayer.running(self) if n not in self.mixtures]

    def running_mixtures(self) -> list[str]:
        return [n for n in AdapterLayer.running(self) if n in self.mixtures]

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): base, plain LoRAs, then each mixture on its own tokens."""
        mixtures = self.running_mixtures()
        self.check_not_stacked(mixtures, bool(self.running()))
        out = super().forward(x)
        if not mixtures:
            return out
        shape, h = out.shape, x.reshape(-1, x.shape[-1])
        out = out.reshape(-1, shape[-1])
        for name in mixtures:
            rows = self.token_rows(name, h.shape[0], h.device)
            if rows is not None and rows.numel() == 0:  # its samples are all padding here
                continue
            delta = self._delta(name, h if rows is None else h[rows], rows, h.shape[0])
            out = out + delta if rows is None else out.index_add(0, rows, delta)
        return out.view(shape)

    def _delta(self, name: str, x: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
        """``sum_e w_e s B_e A_e x'`` for adapter ``name``'s tokens x (N_a, in) -> (N_a, out)."""
        r = self.route_tokens(name, x, rows, n)
        a, b = self.moe_lora_A[name].to(x.dtype), self.moe_lora_B[name].to(x.dtype)
        s, xd = self.options[name].scaling, self.moe_dropout[name](x)
        E, rank = a.shape[0], a.shape[1]
        if self.mixtures[name].mixture.routing == "dense":  # one rank-E*r LoRA with per-token scales
            t = F.linear(xd, a.reshape(E * rank, -1)).view(-1, E, rank) * (r.weights * s).unsqueeze(-1)
            return F.linear(t.reshape(-1, E * rank), b.permute(1, 0, 2).reshape(b.shape[1], E * rank))
        d = dispatch(r.experts, E + 1 if r.variable else E)
        count = int(d.offsets[E - 1]) if r.variable else d.order.numel()
        offsets = d.offsets[:E]
        y = grouped_linear(grouped_linear(xd[d.token_index[:count]], a, offsets) * s, b, offsets)  # (R, out)
        if count < d.order.numel():
            y = torch.cat([y, y.new_zeros(d.order.numel() - count, y.shape[1])])
        return combine(y, d, r.weights)

    def extra_repr(self) -> str:
        plain = super().extra_repr()
        mix = ", ".join(f"{n}: {c.mixture.kind} E={self.router[n].shape[0]} {c.mixture.routing} r={self.options[n].rank}"
                        for n, c in self.mixtures.items())
        return ", ".join(p for p in (plain, mix) if p)
