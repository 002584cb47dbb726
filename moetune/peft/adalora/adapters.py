"""AdaLoRA layers: SVD-form adapters (P, Lambda, Q) on linears and on routed experts, as PEFT 0.21.

Legend: r initial rank (``init_r``), in/out the matrix's features, E experts, k kept triplets.

An AdaLoRA adapter on a linear holds ``P = lora_A`` (r, in), ``Lambda = lora_E`` (r, 1) and
``Q = lora_B`` (out, r) - PEFT's names and shapes - and adds ``s * Q (Lambda * P) drop(x)`` with
``s = alpha / (r + 1e-5)`` (PEFT's ``scaling / ranknum``; ``ranknum`` stays ``init_r`` while the
budget shrinks, so pruning a triplet never rescales the others). Init is PEFT's: P, Q ~ N(0, 0.02),
Lambda = 0, so the adapter starts as a no-op.

On routed experts every expert has its own triplets on each targeted 3D parameter:
``lora_A_{pair}`` (E, r, in), ``lora_E_{pair}`` (E, r, 1), ``lora_B_{pair}`` (E, out, r), run as the
same split-LoRA grouped GEMMs as plain expert LoRA with ``Lambda * P`` in place of A. Each
(expert, parameter) matrix counts as one adapted matrix for the budget (see :mod:`.adalora_alloc`).

Which triplets are kept is a bool mask per adapter (``rank_mask``), written by the rank allocator;
a pruned triplet has ``Lambda = 0``. Files (``peft_tensors``) are the equivalent **plain LoRA**:
``A' = c * (Lambda * P)[kept]``, ``B' = Q[:, kept]`` with ``c = s / (alpha / r)`` and rank pattern
``k`` (alpha pattern ``alpha * k / r``), so PEFT, vLLM and :func:`moetune.load_adapter` reproduce
the AdaLoRA output exactly. A matrix with nothing kept is written at rank 1 with zeros (PEFT
refuses rank 0); experts are zero-padded to the largest k of their experts. PEFT's own AdaLoRA
layout is written by :func:`moetune.peft.adalora_io.save_adalora`.

The wrappers are the plain LoRA wrappers with :class:`SVDLinearMixin` / :class:`SVDExpertsMixin`
in front (:func:`svd_class`), so one module can hold plain LoRA adapters (e.g. a frozen earlier
adapter) beside AdaLoRA ones; a module that already has a plain wrapper is adopted in place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError
from ..core.layer import AdapterLayer
from ..lora.experts import PAIRS, LoraGroupedExperts
from ..lora.experts_layout import PROJ_OF_PAIR
from ..lora.linear import LoraLinear, _Buffers

EPS_RANKNUM = 1e-5  # PEFT divides by ranknum + 1e-5


def svd_scaling(config: LoraConfig) -> float:
    """PEFT's AdaLoRA factor ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``."""
    return config.alpha / (config.r + EPS_RANKNUM)


def _plain(config: LoraConfig) -> LoraConfig:
    return dataclasses.replace(config, adalora=None)


def _folded(a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, c: float
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


class SVDLinearMixin:
    """AdaLoRA adapters on a :class:`LoraLinear` (or subclass); plain adapters pass through."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self._init_svd()

    def _init_svd(self) -> None:
        self.lora_E = nn.ParameterDict()  # name -> Lambda (r, 1)
        self.rank_mask = _Buffers()  # name -> bool (r,): kept triplets

    @classmethod
    def adopt(cls, layer: AdapterLayer) -> AdapterLayer:
        """Turn an existing plain wrapper into this class in place, keeping its adapters."""
        layer.__class__ = cls
        layer._init_svd()
        return layer

    def is_svd(self, name: str) -> bool:
        return name in self.lora_E

    def add_adapter(self, name: str, config: LoraConfig, *, parts: set[str] | None = None) -> None:
        if config.adalora is None:
            return super().add_adapter(name, config, parts=parts)
        super().add_adapter(name, _plain(config), parts=parts)
        self.configs[name], self.scaling[name] = config, svd_scaling(config)
        with torch.no_grad():  # PEFT's reset_lora_parameters
            self.lora_A[name].normal_(0.0, 0.02)
            self.lora_B[name].normal_(0.0, 0.02)
        self.lora_E[name] = nn.Parameter(self.lora_A[name].new_zeros(config.r, 1))
        self.rank_mask.put(name, torch.ones(config.r, dtype=torch.bool, device=self.lora_A[name].device), persistent=False)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_E:
            del self.lora_E[name]
            self.rank_mask.pop(name)

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().adapter_params(name)
        for n in [name] if name is not None else self.adapter_names:
            if n in self.lora_E:
                yield f"lora_E.{n}", self.lora_E[n]

    def svd_triplets(self, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter, nn.Parameter]]:
        """``{name: (P (r, in), Lambda (r, 1), Q (out, r))}``: one matrix, under the mask key ``name``."""
        return {name: (self.lora_A[name], self.lora_E[name], self.lora_B[name])}

    def _adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_E:
            return super()._adapter_output(name, x, base_out)
        a = (self.lora_A[name] * self.lora_E[name]).to(x.dtype)  # Lambda * P, (r, in)
        xd = self.lora_dropout[name](x)
        return F.linear(F.linear(xd, a), self.lora_B[name].to(x.dtype)) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        if name not in self.lora_E:
            return super().delta_weight(name)
        return self.scaling[name] * (self.lora_B[name].float() @ (self.lora_A[name] * self.lora_E[name]).float())

    # --- files: the equivalent plain LoRA -------------------------------------------------
    def _fold(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.scaling[name] / self.configs[name].scaling
        with torch.no_grad():
            return _folded(self.lora_A[name].float(), self.lora_E[name].float(), self.lora_B[name].float(),
                           self.rank_mask.get(name), c)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.lora_E:
            return super().peft_tensors(name)
        a, b = self._fold(name)
        return {"lora_A.weight": a, "lora_B.weight": b}

    def peft_config_targets(self, module_path: str, name: str | None = None) -> dict:
        out = super().peft_config_targets(module_path, name=name)
        if name is not None and name in self.lora_E:
            cfg, k = self.configs[name], max(int(self.rank_mask.get(name).sum()), 1)
            out["rank_pattern"], out["alpha_pattern"] = {module_path: k}, {module_path: cfg.alpha * k / cfg.r}
        return out

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        if name in self.lora_E:
            raise AdapterError(f"{where}: adapter '{name}' is an AdaLoRA adapter; adapter files load as plain LoRA "
                               "(moetune.load_adapter creates a new adapter)")
        super().load_peft_tensors(name, tensors, where=where)


class SVDExpertsMixin:
    """AdaLoRA adapters on a :class:`LoraGroupedExperts` (or subclass): per-expert triplets."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_svd()

    def _init_svd(self) -> None:
        for pair in PAIRS:
            setattr(self, f"lora_E_{pair}", nn.ParameterDict())  # name -> Lambda (E, r, 1)
        self.rank_mask = _Buffers()  # "{name}:{pair}" -> bool (E, r)
        self.svd_names: set[str] = set()

    adopt = classmethod(SVDLinearMixin.adopt.__func__)  # the function, bound to this class

    def lora_e(self, pair: str) -> nn.ParameterDict:
        return getattr(self, f"lora_E_{pair}")

    def is_svd(self, name: str) -> bool:
        return name in self.svd_names

    def add_adapter(self, name: str, config: LoraConfig, *, parts: set[str] | None = None,
                    param_configs: dict[str, LoraConfig] | None = None) -> None:
        if config.adalora is None:
            return super().add_adapter(name, config, parts=parts, param_configs=param_configs)
        if config.expert_rank != "per_expert":
            raise AdapterError("AdaLoRA on routed experts needs expert_rank='per_expert' (each expert's own triplets)")
        if param_configs:
            raise AdapterError("AdaLoRA takes one initial rank for every matrix (no per-parameter rank)")
        super().add_adapter(name, _plain(config), parts=parts)
        self.configs[name] = config
        self.param_configs[name] = {p: config for p in self.param_configs[name]}
        self.svd_names.add(name)
        for pair in self.pairs(name):
            a, b = self.lora_a(pair)[name], self.lora_b(pair)[name]
            with torch.no_grad():
                a.normal_(0.0, 0.02)
                b.normal_(0.0, 0.02)
            self.lora_e(pair)[name] = nn.Parameter(a.new_zeros(*a.shape[:2], 1))
            self.rank_mask.put(f"{name}:{pair}", torch.ones(a.shape[:2], dtype=torch.bool, device=a.device), persistent=False)

    def delete_adapter(self, name: str) -> None:
        pairs = self.pairs(name)
        super().delete_adapter(name)
        if name in self.svd_names:
            for pair in pairs:
                if name in self.lora_e(pair):
                    del self.lora_e(pair)[name]
                self.rank_mask.pop(f"{name}:{pair}")
            self.svd_names.discard(name)

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().adapter_params(name)
        for pair in PAIRS:
            for key, p in self.lora_e(pair).items():
                if name is None or key == name:
                    yield f"lora_E_{pair}.{key}", p

    def svd_triplets(self, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter, nn.Parameter]]:
        """Mask key ``"{name}:{pair}"`` -> (P (E, r, in), Lambda (E, r, 1), Q (E, out, r))."""
        return {f"{name}:{p}": (self.lora_a(p)[name], self.lora_e(p)[name], self.lora_b(p)[name]) for p in self.pairs(name)}

    def scaling(self, name: str, param: str) -> float:
        if name in self.svd_names:
            return svd_scaling(self.configs[name])
        return super().scaling(name, param)

    def _effective_a(self, name: str, pair: str) -> torch.Tensor:
        return self.lora_a(pair)[name] * self.lora_e(pair)[name]  # Lambda * P per expert, (E, r, in)

    def _split_lora(self, name: str, pairs: list[str], x: torch.Tensor, offsets: torch.Tensor,
                    rows: torch.Tensor | None) -> torch.Tensor:
        """``s * Q_e (Lambda_e * P_e) drop(x)`` for one pair on the expert-sorted rows x (R, in)."""
        if name not in self.svd_names:
            return super()._split_lora(name, pairs, x, offsets, rows)
        (pair,) = pairs  # AdaLoRA adapters hold gate_up and/or down pairs only
        config = self.configs[name]
        h = F.dropout(x, config.dropout, self.training) if config.dropout else x
        t = self._matmul(h, self._effective_a(name, pair).to(x.dtype), offsets)  # (R, r)
        s = self.scaling(name, PROJ_OF_PAIR[pair])
        t = t * (s if rows is None else rows * s)
        return self._matmul(t, self.lora_b(pair)[name].to(x.dtype), offsets)

    def delta(self, name: str, pair: str) -> torch.Tensor:
        if name not in self.svd_names:
            return super().delta(name, pair)
        return torch.bmm(self.lora_b(pair)[name], self._effective_a(name, pair)) * self.scaling(name, PROJ_OF_PAIR[pair])

    # --- files: the equivalent plain LoRA -------------------------------------------------
    def _full(self, name: str, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain (E, k_max, in), (E, out, k_max) for an AdaLoRA pair (what every file layout reads)."""
        if name not in self.svd_names:
            return super()._full(name, pair)
        c = self.scaling(name, PROJ_OF_PAIR[pair]) / self.configs[name].scaling
        a, e, b = (t.detach().float() for t in (self.lora_a(pair)[name], self.lora_e(pair)[name], self.lora_b(pair)[name]))
        keep = self.rank_mask.get(f"{name}:{pair}")
        return _pad_rank([_folded(a[i], e[i], b[i], keep[i], c) for i in range(a.shape[0])])

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        if name in self.svd_names:
            raise AdapterError(f"{where}: adapter '{name}' is an AdaLoRA adapter; adapter files load as plain LoRA "
                               "(moetune.load_adapter creates a new adapter)")
        super().load_peft_tensors(name, tensors, where=where)


_CLASSES: dict[type, type] = {}


def svd_class(base_cls: type) -> type[AdapterLayer]:
    """The AdaLoRA-capable subclass of a plain LoRA wrapper class (created once per class)."""
    if issubclass(base_cls, (SVDLinearMixin, SVDExpertsMixin)):
        return base_cls
    if base_cls not in _CLASSES:
        if issubclass(base_cls, LoraLinear):
            mixin = SVDLinearMixin
        elif issubclass(base_cls, LoraGroupedExperts):
            mixin = SVDExpertsMixin
        else:
            raise AdapterError(f"AdaLoRA is not available on {base_cls.__name__} modules (linears and routed experts only)")
        _CLASSES[base_cls] = type(f"SVD{base_cls.__name__}", (mixin, base_cls), {"__module__": __name__})
    return _CLASSES[base_cls]


def svd_wrapper_for(registered: Callable[[nn.Module], type | None]) -> Callable[[nn.Module], type | None]:
    """A ``wrapper_for`` that gives the AdaLoRA class of each module's plain wrapper (an already
    wrapped module keeps its own class, AdaLoRA-capable)."""

    def choose(module: nn.Module) -> type | None:
        base = type(module) if isinstance(module, AdapterLayer) else registered(module)
        return None if base is None else svd_class(base)

    return choose


def svd_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """(path, layer) of every layer holding AdaLoRA adapter ``name`` (any, when None)."""
    for path, module in model.named_modules():
        if isinstance(module, (SVDLinearMixin, SVDExpertsMixin)):
            if name is None or module.is_svd(name):
                yield path, module


SVDLinear = svd_class(LoraLinear)
SVDGroupedExperts = svd_class(LoraGroupedExperts)
