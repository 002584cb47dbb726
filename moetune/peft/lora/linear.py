"""LoRA on an ``nn.Linear``: several named adapters, init, dropout, rsLoRA, DoRA, merge, PiSSA.

Legend: N tokens, in/out the linear's features, r rank, s scaling (``alpha / r``, rsLoRA
``alpha / sqrt(r)``). Adapter ``name`` adds ``s * B @ A @ dropout(x)`` with ``lora_A[name]`` (r, in)
and ``lora_B[name]`` (out, r). Adapter parameters are fp32 whatever the base dtype; the forward
runs in the input's dtype. Gradients are plain autograd (dropout included), so they are exact.

DoRA (``use_dora``) follows PEFT 0.21 exactly: a trained magnitude ``m`` (out,), initialised to
the row norms of ``W + s*B@A``; the output is ``base + (m/n - 1) * W@x' + (m/n) * s * B@A@x'``
with ``n = ||W + s*B@A||`` per row, detached, and ``x' = dropout(x)`` (``x' = x`` when dropout
is off, when PEFT reuses the base output). With several adapters running on one token, each
term is relative to the base output alone (PEFT feeds DoRA the running sum instead; the two agree
whenever one adapter runs, which is the only case PEFT parity is tested on).

PiSSA (``init="pissa"``) moves the top-r singular part of ``W`` into the adapter, as PEFT's
``init_lora_weights="pissa"``: ``A = sqrt(S_r/s) Vh_r``, ``B = U_r sqrt(S_r/s)`` and the base
becomes ``W_res = W - s*B@A``, so the model's output is unchanged at init but **the base weight
is modified**. The initial pair is kept; files are written as the equivalent plain LoRA of rank
2r against the original ``W`` (``A' = [A; A0]``, ``B' = [B, -B0]``, alpha doubled - PEFT's
``path_initial_model_for_weight_conversion``), so PEFT and vLLM load them on the untouched base.
A PiSSA adapter must be the only adapter of its layer; deleting it restores ``W``. Inside
``disable_adapters`` (and in ``save_pretrained`` before merging) the layer holds ``W_res``, not ``W``.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError
from ...model.context import current_context
from ..core.layer import AdapterLayer, register_wrapper


class _Buffers(nn.Module):
    """Named tensors that follow ``.to()`` but are not parameters (PiSSA init, DoRA merge factors)."""

    def put(self, key: str, value: torch.Tensor, *, persistent: bool = True) -> None:
        self.register_buffer(key, value, persistent=persistent)

    def get(self, key: str) -> torch.Tensor | None:
        return self._buffers.get(key)

    def pop(self, key: str) -> torch.Tensor | None:
        self._non_persistent_buffers_set.discard(key)
        return self._buffers.pop(key, None)


class LoraLinear(AdapterLayer):
    """An ``nn.Linear`` (attention/MLP projection or LM head) with named LoRA adapters.

    Args:
        base_layer: the frozen linear, weight (out, in).
    """

    b_side = ("lora_B",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # name -> (out,), DoRA only
        self.lora_dropout = nn.ModuleDict()
        self.pissa_init = _Buffers()  # "{name}_A" (r, in), "{name}_B" (out, r)
        self.dora_factor = _Buffers()  # name -> (out,) m/n of a merged DoRA adapter
        self.configs: dict[str, LoraConfig] = {}
        self.scaling: dict[str, float] = {}

    # --- protocol -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, config: LoraConfig, *, parts: set[str] | None = None) -> None:
        """Create adapter ``name`` (``parts`` is ignored: a linear has one projection)."""
        if name in self.lora_A:
            raise AdapterError(f"adapter '{name}' already exists on this layer")
        if self.configs and (config.init == "pissa" or any(self.is_pissa(n) for n in self.configs)):
            raise AdapterError("a PiSSA adapter changes the base weight, so it must be the only adapter of its layer")
        weight = self.base_layer.weight
        r, scaling = config.r, config.scaling
        a = torch.empty(r, self.in_features, dtype=torch.float32, device=weight.device)
        b = torch.zeros(self.out_features, r, dtype=torch.float32, device=weight.device)
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT's default
        elif config.init == "gaussian":
            nn.init.normal_(a, std=1 / r)  # PEFT's "gaussian": std 1/r
        else:
            a, b = self._pissa(name, r, scaling)
        self.configs[name], self.scaling[name] = config, scaling
        self.lora_A[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.use_dora:
            with torch.no_grad():
                norm = torch.linalg.norm(self.base_weight() + self.delta_weight(name), dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(norm)

    def _pissa(self, name: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.base_layer.weight
        if r > min(weight.shape):
            raise AdapterError(f"init 'pissa' needs r <= min(out, in) = {min(weight.shape)}, got r={r}")
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = torch.sqrt(s[:r] / scaling)
            a = (root[:, None] * vh[:r]).contiguous()
            b = (u[:, :r] * root[None, :]).contiguous()
            weight.copy_((weight.float() - scaling * b @ a).to(weight.dtype))
        self.pissa_init.put(f"{name}_A", a.clone())
        self.pissa_init.put(f"{name}_B", b.clone())
        return a, b

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; a merged one is unmerged first, a PiSSA one restores ``W``."""
        if name in self.merged:
            self.unmerge(name)
        a0, b0 = self.pissa_init.pop(f"{name}_A"), self.pissa_init.pop(f"{name}_B")
        if a0 is not None:
            with torch.no_grad():
                w = self.base_layer.weight
                w.copy_((w.float() + self.scaling[name] * b0 @ a0).to(w.dtype))
        for store in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_dropout):
            if name in store:
                del store[name]
        self.dora_factor.pop(name)
        self.configs.pop(name, None)
        self.scaling.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        for n in [name] if name is not None else self.adapter_names:
            yield f"lora_A.{n}", self.lora_A[n]
            yield f"lora_B.{n}", self.lora_B[n]
            if n in self.lora_magnitude_vector:
                yield f"lora_magnitude_vector.{n}", self.lora_magnitude_vector[n]

    def peft_config_targets(self, module_path: str, name: str | None = None) -> dict:
        """``target_modules`` entry, plus this module's rank and alpha as PEFT patterns (io.py keeps
        only those that differ from the adapter-wide values; PiSSA is written at rank 2r)."""
        out: dict = {"target_modules": [module_path]}
        if name is not None:
            cfg = self.configs[name]
            r, alpha = cfg.r, cfg.alpha
            if self.is_pissa(name):
                r, alpha = 2 * r, alpha * (math.sqrt(2) if cfg.use_rslora else 2)
            out["rank_pattern"], out["alpha_pattern"] = {module_path: r}, {module_path: alpha}
        return out

    def is_pissa(self, name: str) -> bool:
        return self.pissa_init.get(f"{name}_A") is not None

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): base output plus each running adapter, on its tokens only."""
        if self.merged:
            ctx = current_context()
            if self.disabled or (ctx is not None and ctx.adapter_names is not None):
                raise AdapterError(f"adapter(s) {self.merged} are merged into the base weights; unmerge them "
                                   "before disabling adapters or choosing adapters per sample")
        base = result = self.base_layer(x)
        for name in self.running():  # each adapter's term is relative to the base output alone
            delta = self._adapter_output(name, x, base)
            mask = self.token_mask(name, x)
            result = result + (delta if mask is None else delta * mask)
        return result

    def _adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b, s = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype), self.scaling[name]
        dropout = self.lora_dropout[name]
        xd = dropout(x)
        lora = F.linear(F.linear(xd, a), b)
        if name not in self.lora_magnitude_vector:
            return lora * s
        weight = (self.base_weight() if self.merged else self.base_layer.weight.detach()).to(x.dtype)
        norm = torch.linalg.norm(weight + s * (b @ a).detach(), dim=1).detach()
        factor = self.lora_magnitude_vector[name].to(x.dtype) / norm  # (out,)
        if self.merged or (self.training and isinstance(dropout, nn.Dropout)):
            base = F.linear(xd, weight)
        else:
            bias = self.base_layer.bias
            base = base_out if bias is None else base_out - bias
        return (factor - 1) * base + factor * lora * s

    # --- weights --------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` (out, in) in fp32."""
        return self.scaling[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    def _merged_delta(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name)
        factor = self.dora_factor.get(name)
        if factor is None:
            return delta
        return (factor[:, None] - 1) * w0 + factor[:, None] * delta

    def base_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out, fp32, no grad.

        With merged plain deltas ``D_j`` and merged DoRA factors ``f_j``, the current weight is
        ``W = W0 * (1 + sum_j (f_j - 1)) + sum_j f_j * D_j`` (row-wise), solved here for ``W0``.
        """
        w = self.base_layer.weight.detach()
        if not self.merged:
            return w.float()
        with torch.no_grad():
            w, scale = w.float().clone(), torch.ones(self.out_features, device=w.device)
            for n in self.merged:
                factor = self.dora_factor.get(n)
                f = torch.ones_like(scale) if factor is None else factor
                w -= f[:, None] * self.delta_weight(n)
                scale += f - 1
            return w / scale[:, None]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight; a merged adapter no longer runs separately."""
        if name in self.merged:
            return
        w0 = self.base_weight()
        if name in self.lora_magnitude_vector:
            norm = torch.linalg.norm(w0 + self.delta_weight(name), dim=1)
            self.dora_factor.put(name, self.lora_magnitude_vector[name].detach().float() / norm, persistent=False)
        w = self.base_layer.weight
        w.copy_((w.float() + self._merged_delta(name, w0)).to(w.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take a merged adapter back out of the base weight (any order)."""
        if name not in self.merged:
            return
        w0 = self.base_weight()
        w = self.base_layer.weight
        w.copy_((w.float() - self._merged_delta(name, w0)).to(w.dtype))
        self.merged.remove(name)
        self.dora_factor.pop(name)

    # --- files ----------------------------------------------------------------------------
    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.lora_A[name].detach(), self.lora_B[name].detach()
        a0, b0 = self.pissa_init.get(f"{name}_A"), self.pissa_init.get(f"{name}_B")
        if a0 is not None:  # plain LoRA against the original W: s*(BA - B0A0) = s*[B, -B0] @ [A; A0]
            a, b = torch.cat([a, a0]), torch.cat([b, -b0], dim=1)
        out = {"lora_A.weight": a, "lora_B.weight": b}
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name].detach()
        return out

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Fill adapter ``name`` from PEFT tensors; ``where`` is ``"<file>: <key prefix>"``.

        ``base_layer.weight`` (PEFT writes the LM head's base weight when it is targeted) is
        copied into the base, as PEFT does.
        """
        r = self.lora_A[name].shape[0]
        expected = {"lora_A.weight": (r, self.in_features), "lora_B.weight": (self.out_features, r)}
        if name in self.lora_magnitude_vector:
            expected["lora_magnitude_vector"] = (self.out_features,)
        allowed = {**expected, "base_layer.weight": tuple(self.base_layer.weight.shape)}
        for key, t in tensors.items():
            if key not in allowed:
                raise AdapterError(f"{where}.{key}: unexpected tensor for this layer (expected {sorted(expected)})")
            if tuple(t.shape) != allowed[key]:
                raise AdapterError(f"{where}.{key}: shape {tuple(t.shape)} does not match the model, expected "
                                   f"{allowed[key]} (an adapter for a different base model or rank?)")
        for key in expected:
            if key not in tensors:
                raise AdapterError(f"{where}.{key}: missing from the adapter file")
        with torch.no_grad():
            self.lora_A[name].copy_(tensors["lora_A.weight"])
            self.lora_B[name].copy_(tensors["lora_B.weight"])
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].copy_(tensors["lora_magnitude_vector"])
            if "base_layer.weight" in tensors:
                self.base_layer.weight.copy_(tensors["base_layer.weight"])

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={c.r}{' dora' if c.use_dora else ''}" for n, c in self.configs.items())


register_wrapper(nn.Linear, LoraLinear)
