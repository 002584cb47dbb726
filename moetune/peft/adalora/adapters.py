"""AdaLoRA adapters: SVD-form (P, Lambda, Q) on linears and on routed experts, as PEFT 0.21.

Legend: r initial rank (``init_r``), in/out the matrix's features, E experts, k kept triplets.

An AdaLoRA adapter on a linear holds ``P = lora_A`` (r, in), ``Lambda = lora_E`` (r, 1) and
``Q = lora_B`` (out, r) - PEFT's names and shapes - and adds ``s * Q (Lambda * P) drop(x)`` with
``s = alpha / (r + 1e-5)`` (PEFT's ``scaling / ranknum``; ``ranknum`` stays ``init_r`` while the
budget shrinks, so pruning a triplet never rescales the others). Init is PEFT's: P, Q ~ N(0, 0.02),
Lambda = 0, so the adapter starts as a no-op.

On routed experts every expert has its own triplets on each targeted 3D parameter:
``lora_A_{pair}`` (E, r, in), ``lora_E_{pair}`` (E, r, 1), ``lora_B_{pair}`` (E, out, r), run as the
same split-LoRA grouped GEMMs as plain expert LoRA with ``Lambda * P`` in place of A. Each
(expert, parameter) matrix counts as one adapted matrix for the budget (see :mod:`.allocator`).

Which triplets are kept is a bool mask per adapter (``rank_mask``), written by the rank allocator;
a pruned triplet has ``Lambda = 0``. Files (``peft_tensors``) are the equivalent **plain LoRA**:
``A' = c * (Lambda * P)[kept]``, ``B' = Q[:, kept]`` with ``c = s / (alpha / r)`` and rank pattern
``k`` (alpha pattern ``alpha * k / r``), so PEFT, vLLM and :func:`moetune.load_adapter` reproduce
the AdaLoRA output exactly. A matrix with nothing kept is written at rank 1 with zeros (PEFT
refuses rank 0); experts are zero-padded to the largest k of their experts. PEFT's own AdaLoRA
layout is written by :func:`moetune.peft.formats.adalora.save_adalora`.

They are adapter objects (:class:`SvdLinearAdapter`, :class:`SvdExpertAdapter`) held by the plain
LoRA wrappers, so one module holds plain LoRA adapters (e.g. a frozen earlier adapter) beside
AdaLoRA ones; the wrappers keep Lambda in ``lora_E`` and the masks in ``rank_mask``.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ...config import LoraConfig
from ...errors import AdapterError
from ..core.layer import AdapterLayer
from ..lora.expert_adapters import ExpertAdapter
from ..lora.experts import LoraGroupedExperts
from ..lora.experts_layout import PROJ_OF_PAIR
from ..lora.linear import LoraLinear
from ..lora.linear_adapters import LoraAdapter

__all__ = ["EPS_RANKNUM", "SvdExpertAdapter", "SvdLinearAdapter", "svd_adapter", "svd_layers", "svd_scaling"]

EPS_RANKNUM = 1e-5  # PEFT divides by ranknum + 1e-5
_NOT_LOADABLE = "is an AdaLoRA adapter; adapter files load as plain LoRA (moetune.load_adapter creates a new adapter)"


def svd_scaling(config: LoraConfig) -> float:
    """PEFT's AdaLoRA factor ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``."""
    return config.alpha / (config.r + EPS_RANKNUM)


def folded(
    a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix's kept triplets as a plain pair: a (r, in), e (r, 1), b (out, r), keep (r,) ->
    ``c * (e * a)[keep]`` (k, in), ``b[:, keep]`` (out, k); k = 0 becomes one zero pair."""
    a2, b2 = (c * e * a)[keep], b[:, keep]
    if a2.shape[0] == 0:
        a2, b2 = a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1)
    return a2, b2


def _pad_rank(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert pairs of ranks k_e -> (E, k_max, in), (E, out, k_max), zero-padded (exact)."""
    k = max(a.shape[0] for a, _ in pairs)
    a = torch.stack([F.pad(a, (0, 0, 0, k - a.shape[0])) for a, _ in pairs])
    b = torch.stack([F.pad(b, (0, k - b.shape[1])) for _, b in pairs])
    return a, b


class SvdLinearAdapter(LoraAdapter):
    """An AdaLoRA adapter on a linear: ``s * Q (Lambda * P) drop(x)``, PEFT's init."""

    @property
    def scaling(self) -> float:
        return svd_scaling(self.config)

    def create(self, layer: LoraLinear) -> None:
        super().create(layer)
        name = self.name
        with torch.no_grad():  # PEFT's reset_lora_parameters
            layer.lora_A[name].normal_(0.0, 0.02)
            layer.lora_B[name].normal_(0.0, 0.02)
        layer.lora_E[name] = nn.Parameter(layer.lora_A[name].new_zeros(self.config.r, 1))
        layer.rank_mask.put(
            name, torch.ones(self.config.r, dtype=torch.bool, device=layer.lora_A[name].device), persistent=False
        )

    def remove(self, layer: LoraLinear) -> None:
        super().remove(layer)
        del layer.lora_E[self.name]
        layer.rank_mask.pop(self.name)

    def params(self, layer: LoraLinear) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().params(layer)
        yield f"lora_E.{self.name}", layer.lora_E[self.name]

    def _effective_a(self, layer: LoraLinear) -> torch.Tensor:
        return layer.lora_A[self.name] * layer.lora_E[self.name]  # Lambda * P, (r, in)

    @override
    def output(self, layer: LoraLinear, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        xd = layer.lora_dropout[self.name](x)
        return (
            F.linear(F.linear(xd, self._effective_a(layer).to(x.dtype)), layer.lora_B[self.name].to(x.dtype))
            * self.scaling
        )

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return self.scaling * (layer.lora_B[self.name].float() @ self._effective_a(layer).float())

    def file_tensors(self, layer: LoraLinear) -> dict[str, torch.Tensor]:
        """The equivalent plain LoRA of the kept triplets."""
        c = self.scaling / self.config.scaling
        with torch.no_grad():
            a, b = folded(
                layer.lora_A[self.name].float(),
                layer.lora_E[self.name].float(),
                layer.lora_B[self.name].float(),
                layer.rank_mask.get(self.name),
                c,
            )
        return {"lora_A.weight": a, "lora_B.weight": b}

    def rank_alpha(self, layer: LoraLinear) -> tuple[int, float]:
        k = max(int(layer.rank_mask.get(self.name).sum()), 1)
        return k, self.config.alpha * k / self.config.r

    @override
    def load_file_tensors(self, layer: LoraLinear, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        raise AdapterError(f"{where}: adapter '{self.name}' {_NOT_LOADABLE}")


class SvdExpertAdapter(ExpertAdapter):
    """An AdaLoRA adapter on routed experts: every expert's own triplets on each targeted 3D parameter."""

    def __init__(self, name: str, config: LoraConfig, param_configs: dict[str, LoraConfig] | None = None) -> None:
        super().__init__(name, config)
        self.per_param = bool(param_configs)

    def check(self) -> None:
        if self.config.expert_rank != "per_expert":
            raise AdapterError("AdaLoRA on routed experts needs expert_rank='per_expert' (each expert's own triplets)")
        if self.per_param:
            raise AdapterError("AdaLoRA takes one initial rank for every matrix (no per-parameter rank)")
        super().check()

    def create(self, layer: LoraGroupedExperts, pairs: list[str]) -> None:
        super().create(layer, pairs)
        for pair in pairs:
            a, b = layer.lora_a(pair)[self.name], layer.lora_b(pair)[self.name]
            with torch.no_grad():
                a.normal_(0.0, 0.02)
                b.normal_(0.0, 0.02)
            layer.lora_e(pair)[self.name] = nn.Parameter(a.new_zeros(*a.shape[:2], 1))
            layer.rank_mask.put(
                f"{self.name}:{pair}", torch.ones(a.shape[:2], dtype=torch.bool, device=a.device), persistent=False
            )

    def remove(self, layer: LoraGroupedExperts) -> None:
        pairs = layer.pairs(self.name)
        super().remove(layer)
        for pair in pairs:
            del layer.lora_e(pair)[self.name]
            layer.rank_mask.pop(f"{self.name}:{pair}")

    @override
    def scaling(self, param: str) -> float:
        return svd_scaling(self.config)

    def effective_a(self, layer: LoraGroupedExperts, pair: str) -> torch.Tensor:
        return layer.lora_a(pair)[self.name] * layer.lora_e(pair)[self.name]  # Lambda * P per expert, (E, r, in)

    def file_pair(self, layer: LoraGroupedExperts, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain (E, k_max, in), (E, out, k_max) of the kept triplets (what every file layout reads)."""
        c = self.scaling(PROJ_OF_PAIR[pair]) / self.config.scaling
        a, e, b = (
            t.detach().float()
            for t in (layer.lora_a(pair)[self.name], layer.lora_e(pair)[self.name], layer.lora_b(pair)[self.name])
        )
        keep = layer.rank_mask.get(f"{self.name}:{pair}")
        return _pad_rank([folded(a[i], e[i], b[i], keep[i], c) for i in range(a.shape[0])])

    def check_loadable(self, where: str) -> None:
        raise AdapterError(f"{where}: adapter '{self.name}' {_NOT_LOADABLE}")


def svd_adapter(
    layer: AdapterLayer, name: str, config: LoraConfig, param_configs: dict[str, LoraConfig] | None = None
) -> SvdLinearAdapter | SvdExpertAdapter:
    """The AdaLoRA adapter object for wrapper ``layer`` (linears and routed experts only)."""
    if isinstance(layer, LoraLinear):
        return SvdLinearAdapter(name, config)
    if isinstance(layer, LoraGroupedExperts):
        return SvdExpertAdapter(name, config, param_configs)
    raise AdapterError(f"AdaLoRA is not available on {type(layer).__name__} modules (linears and routed experts only)")


def svd_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, LoraLinear | LoraGroupedExperts]]:
    """(path, layer) of every layer holding AdaLoRA adapter ``name`` (any, when None)."""
    for path, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraGroupedExperts)):
            if any(module.is_svd(n) for n in ([name] if name is not None else module.adapter_names)):
                yield path, module
