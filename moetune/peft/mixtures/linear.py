"""Routers inside single linears: MoLA (top-k, every targeted linear) and LoRAMoE (dense soft
mixture on the FFN projections).

Legend: N tokens of the call, N_a tokens one adapter routes, R routed rows (sorted by expert),
in/out the linear's features, E experts, r expert rank, s expert scaling.

A mixture adapter adds ``sum_e w_e s B_e A_e x'`` to the frozen ``W x`` (``x'`` = dropout(x), one
mask per token shared by its experts). Sparse routing (``top_k``, ``top_p``) runs the pairs as
grouped GEMMs on expert-sorted rows; ``dense`` routing is one GEMM with all experts' A stacked
(rank E*r), the per-expert weights applied to the rank dimension, and one GEMM with B stacked -
the soft mixture of E LoRAs is a rank-E*r LoRA with per-token scales.

:class:`MixtureAdapter` is one more :class:`~moetune.peft.lora.linear_adapters.LinearAdapter`
kind; :class:`MixtureLinear` is the :class:`~moetune.peft.lora.linear.LoraLinear` that also holds
its stores and runs it, so plain LoRA adapters live beside the mixtures on the same linear (and
keep PEFT's file layout). A plain wrapper that gets a mixture is taken over by a new
MixtureLinear holding the same parameters (:meth:`MixtureLinear.take_over`).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ...config import LoraConfig
from ...errors import AdapterError
from ...model.grouped import grouped_linear
from ...model.dispatch import combine, dispatch
from ..core.layer import AdapterLayer
from ..lora.linear import LoraLinear
from ..lora.linear_adapters import LinearAdapter, base_device
from .common import (
    ExpertOptions,
    check_not_stacked,
    load_own,
    offsets_with_unused,
    refuse_merge,
    route_tokens,
    routed_rows,
)

_LORA_STORES = (
    "lora_A",
    "lora_B",
    "lora_magnitude_vector",
    "lora_dropout",
    "pissa_init",
    "dora_factor",
    "lora_E",
    "rank_mask",
)


class MixtureAdapter(LinearAdapter):
    """A MoLA / LoRAMoE adapter: a router over E LoRA experts inside one linear."""

    routed = True

    def __init__(self, name: str, config: LoraConfig) -> None:
        super().__init__(name, config)
        self.options = ExpertOptions.of(config, "MixtureLinear.add_adapter")
        self.mixture = config.mixture

    @property
    def scaling(self) -> float:
        return self.options.scaling

    def create(self, layer: MixtureLinear) -> None:
        if self.config.use_dora:
            raise AdapterError(
                f"adapter '{self.name}': DoRA experts exist for mixlora (MixDoRA) only, not for {self.mixture.kind}"
            )
        opts, device = self.options, base_device(layer.base_layer)
        layer.router[self.name] = opts.new_router(layer.in_features, device)
        pair = opts.new_pair(layer.in_features, layer.out_features, device)
        layer.moe_lora_A[self.name], layer.moe_lora_B[self.name] = pair
        layer.moe_dropout[self.name] = opts.new_dropout()

    def remove(self, layer: MixtureLinear) -> None:
        for store in (layer.router, layer.moe_lora_A, layer.moe_lora_B, layer.moe_dropout):
            del store[self.name]

    def params(self, layer: MixtureLinear) -> Iterator[tuple[str, nn.Parameter]]:
        yield f"router.{self.name}", layer.router[self.name]
        yield f"moe_lora_A.{self.name}", layer.moe_lora_A[self.name]
        yield f"moe_lora_B.{self.name}", layer.moe_lora_B[self.name]

    @override
    def output(self, layer: MixtureLinear, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """(N, out) ``sum_e w_e s B_e A_e x'`` on the tokens it routes, zero elsewhere; x (N, in)."""
        rows = routed_rows(layer, self.name, x.shape[0], x.device)
        if rows is None:
            return self._delta(layer, x, None, x.shape[0])
        if rows.numel() == 0:  # its samples are all padding here
            return x.new_zeros(x.shape[0], layer.out_features)
        return x.new_zeros(x.shape[0], layer.out_features).index_add(
            0, rows, self._delta(layer, x[rows], rows, x.shape[0])
        )

    def _delta(self, layer: MixtureLinear, x: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
        """``sum_e w_e s B_e A_e x'`` for its tokens x (N_a, in) -> (N_a, out)."""
        name = self.name
        r = route_tokens(layer, name, self.config, x, rows, n)
        a, b = layer.moe_lora_A[name].to(x.dtype), layer.moe_lora_B[name].to(x.dtype)
        s, xd = self.options.scaling, layer.moe_dropout[name](x)
        E, rank = a.shape[0], a.shape[1]
        if self.mixture.routing == "dense":  # one rank-E*r LoRA with per-token scales
            t = F.linear(xd, a.reshape(E * rank, -1)).view(-1, E, rank) * (r.weights * s).unsqueeze(-1)
            return F.linear(t.reshape(-1, E * rank), b.permute(1, 0, 2).reshape(b.shape[1], E * rank))
        d = dispatch(r.experts, E + 1 if r.variable else E)
        offsets = offsets_with_unused(d.offsets[:E], d.order.numel()) if r.variable else d.offsets
        y = grouped_linear(grouped_linear(xd[d.token_index], a, offsets) * s, b, offsets)  # (R, out)
        return combine(y, d, r.weights)

    @override
    def delta_weight(self, layer: MixtureLinear) -> torch.Tensor:
        refuse_merge(self.name)

    def file_tensors(self, layer: MixtureLinear) -> dict[str, torch.Tensor]:
        """``router.weight`` (E, in), ``experts.lora_A.weight`` (E, r, in), ``experts.lora_B.weight`` (E, out, r)."""
        return {
            "router.weight": layer.router[self.name].detach(),
            "experts.lora_A.weight": layer.moe_lora_A[self.name].detach(),
            "experts.lora_B.weight": layer.moe_lora_B[self.name].detach(),
        }

    def load_file_tensors(self, layer: MixtureLinear, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        load_own(self.file_tensors(layer), tensors, where)


class MixtureLinear(LoraLinear):
    """An ``nn.Linear`` with named LoRA adapters and named mixture-of-LoRA-experts adapters."""

    b_side = (*LoraLinear.b_side, "moe_lora_B")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.router = nn.ParameterDict()  # name -> (E, in) fp32
        self.moe_lora_A = nn.ParameterDict()  # name -> (E, r, in)
        self.moe_lora_B = nn.ParameterDict()  # name -> (E, out, r)
        self.moe_dropout = nn.ModuleDict()

    @classmethod
    @override
    def take_over(cls, layer: AdapterLayer, path: str) -> MixtureLinear:
        """A MixtureLinear holding a plain :class:`LoraLinear`'s base and adapters (the same
        parameter objects, so optimizers and references stay valid)."""
        if type(layer) is not LoraLinear:
            raise AdapterError(
                f"cannot add a mixture adapter to a {type(layer).__name__} (4-bit bases take plain LoRA only)"
            )
        new = cls(layer.base_layer)
        for store in _LORA_STORES:
            setattr(new, store, getattr(layer, store))
        new.adapters, new.configs, new.scaling = layer.adapters, layer.configs, layer.scaling
        new.active, new.disabled, new.merged = layer.active, layer.disabled, layer.merged
        return new.train(layer.training)

    @property
    def mixtures(self) -> dict[str, LoraConfig]:
        return {n: a.config for n, a in self.adapters.items() if a.routed}

    @property
    def options(self) -> dict[str, ExpertOptions]:
        return {n: a.options for n, a in self.adapters.items() if a.routed}

    @property
    def adapter_names(self) -> list[str]:
        """Plain adapters first, then the mixtures (the order they run in)."""
        return [n for n, a in self.adapters.items() if not a.routed] + list(self.mixtures)

    def default_adapter(self, name: str, config: LoraConfig) -> LinearAdapter:
        return MixtureAdapter(name, config) if config.mixture is not None else super().default_adapter(name, config)

    def merge(self, name: str) -> None:
        if self.adapters[name].routed:
            refuse_merge(name)
        if type(self.base_layer) is not nn.Linear:
            raise AdapterError(f"cannot merge adapter '{name}' into a {type(self.base_layer).__name__} base")
        super().merge(name)

    def running(self) -> list[str]:
        """Plain LoRA adapters that run (what :meth:`LoraLinear.forward` adds)."""
        return [n for n in AdapterLayer.running(self) if not self.adapters[n].routed]

    def running_mixtures(self) -> list[str]:
        return [n for n in AdapterLayer.running(self) if self.adapters[n].routed]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): base, plain LoRAs, then each mixture on its own tokens."""
        mixtures = self.running_mixtures()
        check_not_stacked(mixtures, bool(self.running()))
        out = super().forward(x)
        if not mixtures:
            return out
        shape, h = out.shape, x.reshape(-1, x.shape[-1])
        out = out.reshape(-1, shape[-1])
        for name in mixtures:
            out = out + self.adapters[name].output(self, h, out)
        return out.view(shape)

    def extra_repr(self) -> str:
        plain = ", ".join(
            f"{n}: r={c.r}{' dora' if c.use_dora else ''}" for n, c in self.configs.items() if n not in self.mixtures
        )
        mix = ", ".join(
            f"{n}: {c.mixture.kind} E={self.router[n].shape[0]} {c.mixture.routing} r={self.options[n].rank}"
            for n, c in self.mixtures.items()
        )
        return ", ".join(p for p in (plain, mix) if p)
