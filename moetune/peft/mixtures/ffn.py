"""MixLoRA (arXiv 2404.15159) on a dense SwiGLU FFN: a router and E LoRA experts sharing the
frozen FFN; MixDoRA with DoRA experts.

Legend: N tokens of the call, N_a tokens one adapter routes, R routed rows (N_a * k, sorted by
expert), D model dim, F FFN hidden, E experts, r expert rank, s expert scaling.

Expert e is the frozen FFN with its own LoRA pairs on the targeted projections:
``y_e = W2'(act(W1' x) * W3' x)`` with ``W' = W + s B_e A_e``; a token's output is
``sum_e w_e y_e`` over its chosen experts (weights from :mod:`.router`). How it runs:

- the base ``W1 x`` and ``W3 x`` are computed once per token and shared by every expert (and
  every adapter) - they do not depend on the expert;
- the rows (token, expert) are sorted by expert once (:func:`~moetune.model.dispatch.dispatch`) and
  each LoRA term is a grouped GEMM on the sorted rows (split-LoRA: ``(x A_e^T) B_e^T``, never
  ``B_e A_e``); gate and up share one A GEMM; ``W2`` runs once on all R rows;
- dropout on the expert input is one mask per token, shared by the token's experts (as MixLoRA,
  whose gate and up experts read the same dropped input); on the down input, one per row.

DoRA experts (``use_dora``) follow PEFT's DoRA per expert and projection (:mod:`.expert_dora`).

The wrapper registers the FFN's own ``gate_proj``/``up_proj``/``down_proj`` as its children, so
module paths (``mlp.gate_proj``) and base checkpoint keys are unchanged and another adapter can
still put a plain LoRA on those projections.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from typing_extensions import override

from ...config import LoraConfig
from ...errors import AdapterError
from ...model.grouped import grouped_linear
from ...model.layers import SwiGLU
from ...model.dispatch import combine, dispatch
from ..core.layer import DEFAULT_OPTIONS, AdapterLayer, AddOptions
from .common import (
    ExpertOptions,
    base_call,
    check_not_stacked,
    dense_weight,
    load_own,
    offsets_with_unused,
    refuse_merge,
    route_tokens,
    routed_rows,
    scatter_rows,
)
from .expert_dora import dora_factor, dora_output, initial_magnitude

PROJS = ("gate_proj", "up_proj", "down_proj")
SHORT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class MixtureFFN(AdapterLayer):
    """A SwiGLU FFN with named MixLoRA adapters (drop-in: same forward)."""

    transparent = True  # target matching looks inside: its projections keep their module paths
    b_side = tuple(f"lora_B_{short}" for short in SHORT.values())

    def __init__(self, base_layer: SwiGLU) -> None:
        nn.Module.__init__(self)  # not AdapterLayer.__init__: the SwiGLU itself is not registered
        self.__dict__["ffn"] = base_layer
        self.gate_proj, self.up_proj, self.down_proj = base_layer.gate_proj, base_layer.up_proj, base_layer.down_proj
        self.act = base_layer.act
        self.dim, self.hidden = base_layer.gate_proj.in_features, base_layer.gate_proj.out_features
        self.active, self.disabled, self.merged = [], False, []
        self.router = nn.ParameterDict()  # name -> (E, D) fp32
        for proj in PROJS:
            short = SHORT[proj]
            setattr(self, f"lora_A_{short}", nn.ParameterDict())  # name -> (E, r, in)
            setattr(self, f"lora_B_{short}", nn.ParameterDict())  # name -> (E, out, r)
            setattr(self, f"lora_magnitude_{short}", nn.ParameterDict())  # name -> (E, out), DoRA
        self.lora_dropout = nn.ModuleDict()
        self.mixtures: dict[str, LoraConfig] = {}
        self.options: dict[str, ExpertOptions] = {}

    @property
    def base_layer(self) -> SwiGLU:
        """The SwiGLU, with whatever now sits in its projection slots (another adapter's wrapper)."""
        ffn = self.__dict__["ffn"]
        ffn.gate_proj, ffn.up_proj, ffn.down_proj = self.gate_proj, self.up_proj, self.down_proj
        return ffn

    def params(self, kind: str, proj: str) -> nn.ParameterDict:
        """``kind`` in A, B, magnitude; ``proj`` a projection name."""
        return getattr(self, f"lora_{kind}_{SHORT[proj]}")

    # --- protocol -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.mixtures)

    def projections(self, name: str) -> list[str]:
        """The projections adapter ``name`` puts LoRA experts on, in gate, up, down order."""
        return [p for p in PROJS if name in self.params("A", p)]

    @override
    def add_adapter(self, name: str, config: LoraConfig, options: AddOptions = DEFAULT_OPTIONS) -> None:
        """Create MixLoRA adapter ``name`` with experts on ``options.parts`` (default all
        projections); the mixture is the layer's own kind, so ``options.adapter`` must be None."""
        if options.adapter is not None:
            raise AdapterError(f"a MixLoRA FFN holds mixtures only, not {type(options.adapter).__name__} adapters")
        opts = ExpertOptions.of(config, "MixtureFFN.add_adapter")
        if name in self.mixtures:
            raise AdapterError(f"adapter '{name}' already exists on this layer")
        parts = options.chosen_parts(PROJS, "mixlora")
        device = dense_weight(self.gate_proj).device
        dim, hidden = self.dim, self.hidden
        self.router[name] = opts.new_router(dim, device)
        for proj in (p for p in PROJS if p in parts):
            d_in, d_out = (hidden, dim) if proj == "down_proj" else (dim, hidden)
            self.params("A", proj)[name], self.params("B", proj)[name] = opts.new_pair(d_in, d_out, device)
            if config.use_dora:  # m starts at ||W|| per row: every expert equals the frozen layer
                weight = dense_weight(getattr(self, proj))
                self.params("magnitude", proj)[name] = initial_magnitude(weight, opts.num_experts)
        self.lora_dropout[name] = opts.new_dropout()
        self.mixtures[name], self.options[name] = config, opts
        if not self.active:
            self.active.append(name)

    def delete_adapter(self, name: str) -> None:
        for store in [
            self.router,
            self.lora_dropout,
            *(self.params(k, p) for k in ("A", "B", "magnitude") for p in PROJS),
        ]:
            if name in store:
                del store[name]
        self.mixtures.pop(name, None)
        self.options.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        for n in [name] if name is not None else self.adapter_names:
            yield f"router.{n}", self.router[n]
            for proj in self.projections(n):
                for kind in ("A", "B", "magnitude"):
                    if n in self.params(kind, proj):
                        yield f"lora_{kind}_{SHORT[proj]}.{n}", self.params(kind, proj)[n]

    @override
    def merge(self, name: str) -> None:
        refuse_merge(name)

    @override
    def unmerge(self, name: str) -> None:
        return None

    @override
    def peft_config_targets(self, module_path: str, name: str | None = None) -> dict:
        return {"target_modules": [f"{module_path}.{p}" for p in PROJS]}

    # --- files (docs/mixlora.md) ----------------------------------------------------------
    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """``router.weight`` (E, D); per projection ``{proj}.experts.lora_A.weight`` (E, r, in),
        ``.lora_B.weight`` (E, out, r) and, for DoRA, ``.lora_magnitude_vector`` (E, out)."""
        out = {"router.weight": self.router[name].detach()}
        for proj in self.projections(name):
            out[f"{proj}.experts.lora_A.weight"] = self.params("A", proj)[name].detach()
            out[f"{proj}.experts.lora_B.weight"] = self.params("B", proj)[name].detach()
            if name in self.params("magnitude", proj):
                out[f"{proj}.experts.lora_magnitude_vector"] = self.params("magnitude", proj)[name].detach()
        return out

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        load_own(self.peft_tensors(name), tensors, where)

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D): each adapter's tokens through its mixture, the rest through the FFN."""
        names = self.running()
        children = [m for m in (self.gate_proj, self.up_proj, self.down_proj) if isinstance(m, AdapterLayer)]
        check_not_stacked(names, any(m.running() for m in children))
        if not names:
            return self.base_layer(x)
        shape, h = x.shape, x.reshape(-1, x.shape[-1])
        N = h.shape[0]
        rows = {n: routed_rows(self, n, N, h.device) for n in names}
        covered = None if any(r is None for r in rows.values()) else torch.cat(list(rows.values()))
        gate0, up0 = base_call(self.gate_proj, h), base_call(self.up_proj, h)  # (N, F), shared by all experts
        out = None if covered is None else self._uncovered(x, h, gate0, up0, covered, plain=not children)
        for name, idx in rows.items():
            if idx is not None and idx.numel() == 0:  # its samples are all padding here
                continue
            if idx is None:
                y = self._mixture(name, h, gate0, up0, None, N)
            else:
                y = self._mixture(name, h[idx], gate0[idx], up0[idx], idx, N)
            out = scatter_rows(out, idx, y)
        return out.view(shape)

    def _uncovered(self, x, h, gate0, up0, covered, *, plain: bool) -> torch.Tensor:
        """(N, D) frozen-FFN output for tokens no mixture routes (padding, other adapters' samples)."""
        if not plain:  # the projections carry other adapters: let them run on their own samples
            return self.base_layer(x).reshape(h.shape[0], -1)
        if covered.shape[0] == h.shape[0]:  # the mixtures' rows (disjoint: one adapter per sample) are all of them
            return h.new_zeros(h.shape[0], self.dim)
        rest = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        rest[covered] = False
        out = h.new_zeros(h.shape[0], self.dim)
        idx = rest.nonzero().squeeze(1)
        if idx.numel():
            out = out.index_copy(0, idx, base_call(self.down_proj, self.act(gate0[idx]) * up0[idx]))
        return out

    def _mixture(
        self, name: str, x: torch.Tensor, gate0: torch.Tensor, up0: torch.Tensor, rows: torch.Tensor | None, n: int
    ) -> torch.Tensor:
        """One adapter on its N_a tokens: x (N_a, D), gate0/up0 (N_a, F) -> (N_a, D)."""
        r = route_tokens(self, name, self.mixtures[name], x, rows, n)
        E = self.router[name].shape[0]
        d = dispatch(r.experts, E + 1 if r.variable else E)
        count, offsets = d.order.numel(), d.offsets
        if r.variable and self.mixtures[name].mixture.routing == "switch":  # unused slots: the few dropped tokens
            offsets = offsets_with_unused(d.offsets[:E], count)
        elif r.variable:  # top_p: most of the E slots per token are unused; the dense FFN skips them,
            count, offsets = int(d.offsets[E - 1]), d.offsets[:E]  # which needs their number (a host sync)
        tok = d.token_index[:count]
        expert = r.experts.reshape(-1)[d.order[:count]].clamp_max(E - 1)  # (R,) expert of each sorted row
        drop = self.lora_dropout[name]
        dropping = self.training and not isinstance(drop, nn.Identity)  # DoRA then needs W x' too
        xd = drop(x)  # one mask per token, shared by its experts
        gate, up = self._gate_up(name, x, xd, gate0, up0, tok, offsets, expert, dropped=dropping)
        hidden = self.act(gate) * up  # (R, F)
        y = base_call(self.down_proj, hidden)  # (R, D)
        if "down_proj" in self.projections(name):
            y = self._project(name, "down_proj", hidden, drop(hidden), y, offsets, expert, dropped=dropping)
        if count < d.order.numel():  # unused top_p slots contribute zero rows
            y = torch.cat([y, y.new_zeros(d.order.numel() - count, y.shape[1])])
        out = combine(y, d, r.weights)
        if r.base_weight is not None:  # switch: the frozen FFN's share
            out = out + r.base_weight[:, None] * base_call(self.down_proj, self.act(gate0) * up0)
        return out

    def _gate_up(self, name, x, xd, gate0, up0, tok, offsets, expert, *, dropped: bool):
        """(R, F) gate and up pre-activations of every routed row; the A GEMMs of gate and up run
        as one grouped GEMM over their concatenated ranks."""
        projs = [p for p in ("gate_proj", "up_proj") if p in self.projections(name)]
        outs = {"gate_proj": gate0[tok], "up_proj": up0[tok]}
        if not projs:
            return outs["gate_proj"], outs["up_proj"]
        xr = xd[tok]  # (R, D)
        a = torch.cat([self.params("A", p)[name] for p in projs], dim=1).to(x.dtype)  # (E, r*, D)
        t = self.grouped(xr, a, offsets).split([self.params("A", p)[name].shape[1] for p in projs], dim=-1)
        drop_base = {}
        if dropped and name in self.params("magnitude", projs[0]):
            drop_base = {p: base_call(getattr(self, p), xd)[tok] for p in projs}
        for p, tp in zip(projs, t):
            outs[p] = self._combine_lora(name, p, outs[p], drop_base.get(p, outs[p]), tp, offsets, expert)
        return outs["gate_proj"], outs["up_proj"]

    def _project(self, name, proj, h, hd, base, offsets, expert, *, dropped: bool) -> torch.Tensor:
        """LoRA experts of ``proj`` added to its base output ``base`` (R, out); ``hd`` = dropout(h)."""
        t = self.grouped(hd, self.params("A", proj)[name].to(h.dtype), offsets)  # (R, r)
        dora = name in self.params("magnitude", proj)
        base_dropped = base_call(getattr(self, proj), hd) if dropped and dora else base
        return self._combine_lora(name, proj, base, base_dropped, t, offsets, expert)

    def _combine_lora(self, name, proj, base, base_dropped, t, offsets, expert) -> torch.Tensor:
        """``base + s B_e t`` (LoRA) or PEFT's DoRA ``base + (f - 1) W x' + f s B_e t`` with
        ``f = m_e / ||W + s B_e A_e||``; ``t`` (R, r) = ``A_e x'``."""
        s = self.options[name].scaling
        lora = self.grouped(t * s, self.params("B", proj)[name].to(t.dtype), offsets)  # (R, out)
        if name not in self.params("magnitude", proj):
            return base + lora
        factor = self.dora_factor(name, proj).to(t.dtype)[expert]  # (R, out)
        return dora_output(base, base_dropped, lora, factor)

    def dora_factor(self, name: str, proj: str) -> torch.Tensor:
        """(E, out) ``m_e / ||W + s B_e A_e||`` of adapter ``name`` on ``proj`` (norm detached)."""
        a, b = self.params("A", proj)[name], self.params("B", proj)[name]
        weight = dense_weight(getattr(self, proj))
        return dora_factor(weight, a, b, self.params("magnitude", proj)[name], self.options[name].scaling)

    def grouped(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Per-expert ``x_e @ w_e^T`` on expert-sorted rows (the routed experts' grouped GEMM)."""
        return grouped_linear(x, w, offsets)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{n}: E={self.router[n].shape[0]} {c.mixture.routing} r={self.options[n].rank}"
            f"{' dora' if c.use_dora else ''}"
            for n, c in self.mixtures.items()
        )
