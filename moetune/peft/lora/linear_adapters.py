"""The adapters a :class:`~.linear.LoraLinear` holds: plain LoRA (with PiSSA init) and DoRA.

Every adapter of a linear is one object with the same small interface, :class:`LinearAdapter`:
create (init), remove, its parameters, its output on the layer's input (the delta), its weight
delta (to fold it into the base), and its file tensors both ways. The wrapper holds them by
name and never asks which kind it holds. AdaLoRA's SVD form (:mod:`moetune.peft.adalora.linear`)
and the mixtures of LoRA experts (:mod:`moetune.peft.mixtures.linear`) are further
:class:`LinearAdapter` kinds.

Parameters live in the wrapper's ``ParameterDict`` stores keyed by adapter name (``lora_A``,
``lora_B``, ...), so module paths, ``state_dict`` keys and PEFT's names are those of the layer;
an adapter object holds its name and config only, and is handed the layer on every call.

Legend: in/out the linear's features, r rank, s scaling. See :mod:`.linear` for the maths.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ...config import LoraConfig
from ...errors import AdapterError
from ..core.layer import AdapterLayer
from ..core.tensors import check_tensors

__all__ = ["DoraAdapter", "LinearAdapter", "LoraAdapter", "lora_adapter"]


class LinearAdapter:
    """One named adapter of a :class:`~.linear.LoraLinear` (the interface every kind implements).

    Attributes:
        routed: whether it picks its own tokens (a mixture); the layer then runs it after the
            others and applies no per-sample mask to it.
    """

    routed = False

    def __init__(self, name: str, config: LoraConfig) -> None:
        self.name, self.config = name, config

    @property
    def scaling(self) -> float:
        """The factor s of its delta."""
        return self.config.scaling

    def create(self, layer: AdapterLayer) -> None:
        """Make and initialise the parameters in the layer's stores."""
        raise NotImplementedError

    def remove(self, layer: AdapterLayer) -> None:
        raise NotImplementedError

    def params(self, layer: AdapterLayer) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter), local names as ``<store>.<adapter name>``."""
        raise NotImplementedError

    def output(self, layer: AdapterLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapter's term (..., out) added to the base output ``base_out`` for input ``x``."""
        raise NotImplementedError

    def delta_weight(self, layer: AdapterLayer) -> torch.Tensor:
        """``s * B @ A`` (out, in) in fp32 (what merging adds to the weight)."""
        raise NotImplementedError

    def merge_factor(self, layer: AdapterLayer, w0: torch.Tensor) -> torch.Tensor | None:  # noqa: ARG002 - DoRA uses them
        """DoRA's per-row ``m / ||W0 + delta||`` at merge time; None for a plain delta."""
        return None

    def file_tensors(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        """Tensors as PEFT stores them, keyed by the suffix after the module path."""
        raise NotImplementedError

    def load_file_tensors(self, layer: AdapterLayer, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        raise NotImplementedError

    def rank_alpha(self, layer: AdapterLayer) -> tuple[int, float]:  # noqa: ARG002 - PiSSA's needs the layer
        """The (rank, alpha) its file is written with (``rank_pattern`` / ``alpha_pattern``)."""
        return self.config.r, self.config.alpha


def base_device(base: nn.Module) -> torch.device:
    """Where a base layer's tensors are, without reading its weight (a stored base would dequantize)."""
    return next(itertools.chain(base.parameters(), base.buffers())).device


class LoraAdapter(LinearAdapter):
    """Plain LoRA: ``s * B @ A @ dropout(x)``; ``init="pissa"`` starts from the top-r singular part of W."""

    def create(self, layer: AdapterLayer) -> None:
        config, device = self.config, base_device(layer.base_layer)
        r = config.r
        a = torch.empty(r, layer.in_features, dtype=torch.float32, device=device)
        b = torch.zeros(layer.out_features, r, dtype=torch.float32, device=device)
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT's default
        elif config.init == "gaussian":
            nn.init.normal_(a, std=1 / r)  # PEFT's "gaussian": std 1/r
        else:
            a, b = self._pissa(layer, r, config.scaling)
        layer.lora_A[self.name], layer.lora_B[self.name] = nn.Parameter(a), nn.Parameter(b)
        layer.lora_dropout[self.name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _pissa(self, layer: AdapterLayer, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not layer.base_is_writable:
            raise AdapterError(
                "init='pissa' rewrites the base weight, which is held quantized here (nf4 or fp8); "
                "use init='kaiming' or 'gaussian', or load a full-precision base"
            )
        weight = layer.base_layer.weight
        if r > min(weight.shape):
            raise AdapterError(f"init 'pissa' needs r <= min(out, in) = {min(weight.shape)}, got r={r}")
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = torch.sqrt(s[:r] / scaling)
            a = (root[:, None] * vh[:r]).contiguous()
            b = (u[:, :r] * root[None, :]).contiguous()
            weight.copy_((weight.float() - scaling * b @ a).to(weight.dtype))
        layer.pissa_init.put(f"{self.name}_A", a.clone())
        layer.pissa_init.put(f"{self.name}_B", b.clone())
        return a, b

    def is_pissa(self, layer: AdapterLayer) -> bool:
        return layer.pissa_init.get(f"{self.name}_A") is not None

    def remove(self, layer: AdapterLayer) -> None:
        """Drop the parameters; a PiSSA adapter gives ``W`` back its top-r part."""
        name = self.name
        a0, b0 = layer.pissa_init.pop(f"{name}_A"), layer.pissa_init.pop(f"{name}_B")
        if a0 is not None:
            with torch.no_grad():
                w = layer.base_layer.weight
                w.copy_((w.float() + self.scaling * b0 @ a0).to(w.dtype))
        for store in (layer.lora_A, layer.lora_B, layer.lora_dropout):
            del store[name]

    def params(self, layer: AdapterLayer) -> Iterator[tuple[str, nn.Parameter]]:
        yield f"lora_A.{self.name}", layer.lora_A[self.name]
        yield f"lora_B.{self.name}", layer.lora_B[self.name]

    @override
    def output(self, layer: AdapterLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = layer.lora_A[self.name].to(x.dtype), layer.lora_B[self.name].to(x.dtype)
        return F.linear(F.linear(layer.lora_dropout[self.name](x), a), b) * self.scaling

    def delta_weight(self, layer: AdapterLayer) -> torch.Tensor:
        return self.scaling * (layer.lora_B[self.name].float() @ layer.lora_A[self.name].float())

    def file_tensors(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        """``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r); PiSSA as plain LoRA of rank 2r
        against the original W: ``s*(BA - B0A0) = s*[B, -B0] @ [A; A0]``."""
        a, b = layer.lora_A[self.name].detach(), layer.lora_B[self.name].detach()
        a0, b0 = layer.pissa_init.get(f"{self.name}_A"), layer.pissa_init.get(f"{self.name}_B")
        if a0 is not None:
            a, b = torch.cat([a, a0]), torch.cat([b, -b0], dim=1)
        return {"lora_A.weight": a, "lora_B.weight": b}

    @override
    def rank_alpha(self, layer: AdapterLayer) -> tuple[int, float]:
        r, alpha = self.config.r, self.config.alpha
        if self.config.init == "pissa":  # written converted, at rank 2r with the same scaling
            return 2 * r, alpha * (math.sqrt(2) if self.config.use_rslora else 2)
        return r, alpha

    def expected_tensors(self, layer: AdapterLayer) -> dict[str, tuple[int, ...]]:
        r = layer.lora_A[self.name].shape[0]
        return {"lora_A.weight": (r, layer.in_features), "lora_B.weight": (layer.out_features, r)}

    def load_file_tensors(self, layer: AdapterLayer, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """``base_layer.weight`` (PEFT writes the LM head's base weight when it is targeted) is
        copied into the base, as PEFT does."""
        expected = self.expected_tensors(layer)
        check_tensors(expected, tensors, where, optional={"base_layer.weight": (layer.out_features, layer.in_features)})
        with torch.no_grad():
            for key in expected:
                getattr(layer, key.removesuffix(".weight"))[self.name].copy_(tensors[key])
            if "base_layer.weight" in tensors:
                layer.base_layer.weight.copy_(tensors["base_layer.weight"])


class DoraAdapter(LoraAdapter):
    """DoRA: LoRA plus a trained magnitude ``m`` (out,), PEFT 0.21's formula (see :mod:`.linear`)."""

    def create(self, layer: AdapterLayer) -> None:
        super().create(layer)
        with torch.no_grad():
            norm = torch.linalg.norm(layer.base_weight() + self.delta_weight(layer), dim=1)
        layer.lora_magnitude_vector[self.name] = nn.Parameter(norm)

    def remove(self, layer: AdapterLayer) -> None:
        super().remove(layer)
        del layer.lora_magnitude_vector[self.name]

    def params(self, layer: AdapterLayer) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().params(layer)
        yield f"lora_magnitude_vector.{self.name}", layer.lora_magnitude_vector[self.name]

    def output(self, layer: AdapterLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``(m/n - 1) * W@x' + (m/n) * s * B@A@x'`` with ``n = ||W + s*B@A||`` per row, detached."""
        name, s = self.name, self.scaling
        a, b = layer.lora_A[name].to(x.dtype), layer.lora_B[name].to(x.dtype)
        dropout = layer.lora_dropout[name]
        xd = dropout(x)
        lora = F.linear(F.linear(xd, a), b)
        weight = (layer.base_weight() if layer.merged else layer.base_layer.weight.detach()).to(x.dtype)
        norm = torch.linalg.norm(weight + s * (b @ a).detach(), dim=1).detach()
        factor = layer.lora_magnitude_vector[name].to(x.dtype) / norm  # (out,)
        if layer.merged or (layer.training and isinstance(dropout, nn.Dropout)):
            base = F.linear(xd, weight)
        else:
            bias = layer.base_layer.bias
            base = base_out if bias is None else base_out - bias
        return (factor - 1) * base + factor * lora * s

    def merge_factor(self, layer: AdapterLayer, w0: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.norm(w0 + self.delta_weight(layer), dim=1)
        return layer.lora_magnitude_vector[self.name].detach().float() / norm

    def file_tensors(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        return {**super().file_tensors(layer), "lora_magnitude_vector": layer.lora_magnitude_vector[self.name].detach()}

    def expected_tensors(self, layer: AdapterLayer) -> dict[str, tuple[int, ...]]:
        return {**super().expected_tensors(layer), "lora_magnitude_vector": (layer.out_features,)}


def lora_adapter(name: str, config: LoraConfig) -> LinearAdapter:
    """The LoRA-family adapter object for ``config`` (DoRA with ``use_dora``)."""
    return (DoraAdapter if config.use_dora else LoraAdapter)(name, config)
