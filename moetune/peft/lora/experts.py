"""LoRA on routed experts: split-LoRA grouped GEMMs on the expert-sorted rows.

Legend: R routed rows (sorted by expert), D model dim, F expert hidden, E experts, r rank, s scaling.

For every row of expert e the adapter adds ``s * B_e (A_e drop(x))`` with two more grouped GEMMs on
the same ``offsets`` as the base; ``B_e @ A_e`` is only formed to merge. An adapter holds up to
three pairs, stored in ParameterDicts keyed by adapter name (A fp32 ``(E, r, in)``, B ``(E, out, r)``;
``expert_rank="shared"`` drops the E dim: one pair for all experts):

    lora_A_gate_up / lora_B_gate_up   (E, r, D) / (E, 2F, r)   gate_proj and up_proj both targeted
    lora_A_gate    / lora_B_gate      (E, r, D) / (E, F, r)    gate_proj alone (gate half only)
    lora_A_up      / lora_B_up        (E, r, D) / (E, F, r)    up_proj alone (up half only)
    lora_A_down    / lora_B_down      (E, r, F) / (E, D, r)    down_proj

Why one fused gate_up pair when both are targeted: it is exactly PEFT's ``target_parameters`` pair
on transformers-5 experts (same tensors, count and init), so files map one to one and training
matches PEFT's; and it costs one rank-r A GEMM instead of a rank-2r one. Separate ``gate`` + ``up``
pairs only arise when a per-expert (vLLM) file holds different A's for them; the forward then runs
their A's as one concatenated grouped GEMM and each B on its half, and the PEFT export is the exact
rank-2r block-diagonal pair (see :mod:`.experts_layout`).

Each named adapter is an object of :mod:`.expert_adapters` (plain pairs, or AdaLoRA's triplets);
the layer runs them all the same way, with ``effective_a`` as the A side.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LoraConfig
from ...model.grouped import RowLayout
from ...model.moe import GroupedExperts
from ..core.layer import DEFAULT_OPTIONS, AdapterLayer, AddOptions, TensorStore
from . import experts_layout as layout
from .expert_adapters import ExpertAdapter
from .experts_layout import PROJ_OF_PAIR
from .stacked_experts import stacked_experts, stacked_slots

PAIRS = ("gate_up", "gate", "up", "down")


class LoraGroupedExperts(AdapterLayer):
    """Named LoRA adapters on a :class:`GroupedExperts` (drop-in: same forward signature)."""

    base_layer: GroupedExperts
    b_side = tuple(f"lora_B_{pair}" for pair in PAIRS)

    def __init__(self, base_layer: GroupedExperts) -> None:
        super().__init__(base_layer)
        for pair in PAIRS:
            setattr(self, f"lora_A_{pair}", nn.ParameterDict())
            setattr(self, f"lora_B_{pair}", nn.ParameterDict())
            setattr(self, f"lora_E_{pair}", nn.ParameterDict())  # AdaLoRA's Lambda (E, r, 1)
        self.rank_mask = TensorStore()  # AdaLoRA: "{name}:{pair}" -> bool (E, r), kept triplets
        self.adapters: dict[str, ExpertAdapter] = {}

    # --- what MoEBlock reads from its experts ---------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.base_layer.num_experts

    @property
    def dim(self) -> int:
        return self.base_layer.dim

    @property
    def hidden(self) -> int:
        return self.base_layer.hidden

    # --- adapters -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def configs(self) -> dict[str, LoraConfig]:
        return {n: a.config for n, a in self.adapters.items()}

    @property
    def param_configs(self) -> dict[str, dict[str, LoraConfig]]:
        """Rank/alpha per 3D parameter of each adapter."""
        return {n: a.param_configs for n, a in self.adapters.items()}

    def lora_a(self, pair: str) -> nn.ParameterDict:
        return getattr(self, f"lora_A_{pair}")

    def lora_b(self, pair: str) -> nn.ParameterDict:
        return getattr(self, f"lora_B_{pair}")

    def lora_e(self, pair: str) -> nn.ParameterDict:
        return getattr(self, f"lora_E_{pair}")

    def pairs(self, name: str) -> list[str]:
        """The pairs adapter ``name`` holds, in :data:`PAIRS` order."""
        return [p for p in PAIRS if name in self.lora_a(p)]

    def add_adapter(self, name: str, config: LoraConfig, options: AddOptions = DEFAULT_OPTIONS) -> None:
        """Create adapter ``name`` on ``options.parts`` (default all of gate_proj, up_proj, down_proj),
        with ``options.param_configs`` (rank/alpha per base parameter, ``gate_up_proj`` / ``down_proj``,
        from PEFT's ``rank_pattern``/``alpha_pattern``) and ``options.adapter`` (default: LoRA pairs).

        Calling again for an existing name adds the new parts and re-initialises the adapter.
        """
        parts = options.chosen_parts(layout.EXPERT_PROJS, "experts")
        adapter = options.adapter if options.adapter is not None else ExpertAdapter(name, config, options.param_configs)
        adapter.check()
        if name in self.adapters:
            parts |= {p for pair in self.pairs(name) for p in _parts_of(pair)}
            self.delete_adapter(name)
        gate, up = "gate_proj" in parts, "up_proj" in parts
        pairs = ["gate_up"] if gate and up else ["gate"] if gate else ["up"] if up else []
        pairs += ["down"] if "down_proj" in parts else []
        self.adapters[name] = adapter
        adapter.create(self, pairs)
        if not self.active:
            self.active.append(name)

    def scaling(self, name: str, param: str) -> float:
        """The factor s of adapter ``name`` on base parameter ``param`` (gate_up_proj or down_proj)."""
        return self.adapters[name].scaling(param)

    def dims(self, pair: str) -> tuple[int, int]:
        """(in, out) features of ``pair``."""
        D, Fh = self.dim, self.hidden
        return {"gate_up": (D, 2 * Fh), "gate": (D, Fh), "up": (D, Fh), "down": (Fh, D)}[pair]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        self.adapters.pop(name).remove(self)
        self.active = [n for n in self.active if n != name]

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        stores = [(kind, pair) for pair in PAIRS for kind in "AB"] + [("E", pair) for pair in PAIRS]
        for kind, pair in stores:
            for key, p in getattr(self, f"lora_{kind}_{pair}").items():
                if name is None or key == name:
                    yield f"lora_{kind}_{pair}.{key}", p

    def svd_triplets(self, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter, nn.Parameter]]:
        """Mask key ``"{name}:{pair}"`` -> (P (E, r, in), Lambda (E, r, 1), Q (E, out, r)) of an AdaLoRA adapter."""
        return {
            f"{name}:{p}": (self.lora_a(p)[name], self.lora_e(p)[name], self.lora_b(p)[name]) for p in self.pairs(name)
        }

    def is_svd(self, name: str) -> bool:
        return any(name in self.lora_e(p) for p in PAIRS)

    # --- forward --------------------------------------------------------------------------
    def row_subgroups(self) -> tuple[torch.Tensor, int] | None:
        """The adapter slot of each token when the samples choose among adapters: the dispatch then
        sorts each expert's rows by slot, as :mod:`.stacked_experts` needs them."""
        slots = stacked_slots(self, self.running())
        return None if slots is None else (self.selection().slot_of_token, len(slots))

    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor, *, token_index: torch.Tensor, groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (R, D) sorted by expert; offsets (E,) int32 cumulative ends; token_index (R,); groups:
        the dispatch's (expert, slot) ends when it sorted by :meth:`row_subgroups` -> (R, D).

        Where the base places the rows for its GEMMs (CPU bf16/fp16, :meth:`GroupedExperts.layout`),
        they are placed once for the base and every adapter's GEMMs. When the samples choose
        among adapters, every adapter runs on its own rows (:mod:`.stacked_experts`)."""
        names = self.running()
        slots = stacked_slots(self, names)
        if slots is not None:
            return stacked_experts(self, x, offsets, token_index, slots, groups)
        layout = self.base_layer.layout(x, offsets)
        if layout is None:
            return self._experts(x, offsets, names, None)
        return layout.take(self._experts(layout.place(x), layout.offsets, names, layout))

    def _experts(self, x, offsets, names: list[str], layout: RowLayout | None):
        """The base's stages and every adapter's delta on all of x's rows (placed in ``layout`` if
        not None)."""
        base, placed = self.base_layer, layout is not None
        gate_up = base.project_gate_up(x, offsets, placed)  # (R, 2F)
        for n in names:
            if _gate_up_groups(self.pairs(n)) != ([], []):
                gate_up = gate_up + self._gate_up_delta(n, x, offsets, layout)
        h = base.gated(gate_up)  # (R, F)
        out = base.project_down(h, offsets, placed)  # (R, D)
        for n in names:
            if "down" in self.pairs(n):
                out = out + self._split_lora(n, ["down"], h, offsets, layout)
        return out

    def _gate_up_delta(self, name: str, x: torch.Tensor, offsets: torch.Tensor, layout: RowLayout | None = None):
        """Adapter ``name``'s (R, 2F) delta on the gate_up output: one fused pair over the 2F rows,
        or gate+up pairs with their A's in one grouped GEMM, or a lone half zero-padded to 2F."""
        fused, alone = _gate_up_groups(self.pairs(name))
        delta = self._split_lora(name, fused, x, offsets, layout) if fused else None
        for half in alone:
            pad = (0, self.hidden) if half == "gate" else (self.hidden, 0)
            d = F.pad(self._split_lora(name, [half], x, offsets, layout), pad)
            delta = d if delta is None else delta + d
        return delta

    def _split_lora(self, name: str, pairs: list[str], x, offsets, layout: RowLayout | None = None) -> torch.Tensor:
        """``s * B (A drop(x))`` per expert for ``pairs`` sharing input x; outputs concatenated. The
        dropout mask of placed rows is drawn over the rows themselves: the same random numbers."""
        adapter = self.adapters[name]
        config = adapter.config
        h, placed = x, layout is not None
        if config.dropout and self.training:
            h = F.dropout(x, config.dropout) if not placed else layout.place(F.dropout(layout.take(x), config.dropout))
        a_list = [adapter.effective_a(self, p).to(x.dtype) for p in pairs]
        t = self._matmul(h, a_list[0] if len(a_list) == 1 else torch.cat(a_list, dim=-2), offsets, placed)
        s = adapter.scaling(PROJ_OF_PAIR[pairs[0]])
        t = t * s
        b_list = [self.lora_b(p)[name] for p in pairs]
        parts = t.split([b.shape[-1] for b in b_list], dim=-1) if len(pairs) > 1 else [t]
        outs = [self._matmul(tp, b.to(x.dtype), offsets, placed) for tp, b in zip(parts, b_list)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, placed: bool) -> torch.Tensor:
        return F.linear(x, w) if w.dim() == 2 else self.base_layer.linear(x, w, offsets, placed)

    # --- merge ----------------------------------------------------------------------------
    def delta(self, name: str, pair: str) -> torch.Tensor:
        """fp32 ``s * B_e @ A_e`` for every expert, (E, out, in). Merging only, never the forward."""
        adapter = self.adapters[name]
        a, b = adapter.effective_a(self, pair), self.lora_b(pair)[name]
        d = (b @ a).expand(self.num_experts, -1, -1) if a.dim() == 2 else torch.bmm(b, a)
        return d * adapter.scaling(PROJ_OF_PAIR[pair])

    def _fold(self, name: str, sign: float) -> None:
        Fh = self.hidden
        rows = {"gate_up": slice(None), "gate": slice(0, Fh), "up": slice(Fh, 2 * Fh), "down": slice(None)}
        with torch.no_grad():
            for pair in self.pairs(name):
                w = getattr(self.base_layer, PROJ_OF_PAIR[pair]).data[:, rows[pair]]
                w.copy_((w.float() + sign * self.delta(name, pair).to(w.device)).to(w.dtype))

    def merge(self, name: str) -> None:
        if name not in self.merged:
            self._fold(name, 1.0)
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self._fold(name, -1.0)
            self.merged.remove(name)

    # --- files (the layouts are in experts_layout) ----------------------------------------
    def targeted_params(self, names: list[str]) -> list[str]:
        return layout.targeted_params(self, names)

    def peft_config_targets(self, module_path: str, name: str | None = None) -> dict:
        return layout.peft_config_targets(self, module_path, name)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return layout.peft_tensors(self, name)

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        layout.load_peft_tensors(self, name, tensors, where=where)

    def per_expert_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """vLLM/SGLang layout (see :func:`.experts_layout.per_expert_tensors`)."""
        return layout.per_expert_tensors(self, name)

    def load_per_expert_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        layout.load_per_expert_tensors(self, name, tensors, where=where)


def _gate_up_groups(pairs: list[str]) -> tuple[list[str], list[str]]:
    """Split an adapter's gate/up pairs into those added to the fused 2F output and lone halves."""
    if "gate_up" in pairs:
        return ["gate_up"], []
    halves = [p for p in ("gate", "up") if p in pairs]
    return (halves, []) if len(halves) == 2 else ([], halves)


def _parts_of(pair: str) -> tuple[str, ...]:
    return ("gate_proj", "up_proj") if pair == "gate_up" else (f"{pair}_proj",)
