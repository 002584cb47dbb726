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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..model.context import current_context
from ..model.moe import GroupedExperts
from . import experts_layout as layout
from .base import AdapterLayer, register_wrapper

if TYPE_CHECKING:
    from ..config import LoraConfig

PAIRS = ("gate_up", "gate", "up", "down")
PROJ_OF_PAIR = {"gate_up": "gate_up_proj", "gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}


class LoraGroupedExperts(AdapterLayer):
    """Named LoRA adapters on a :class:`GroupedExperts` (drop-in: same forward signature)."""

    base_layer: GroupedExperts

    def __init__(self, base_layer: GroupedExperts) -> None:
        super().__init__(base_layer)
        for pair in PAIRS:
            setattr(self, f"lora_A_{pair}", nn.ParameterDict())
            setattr(self, f"lora_B_{pair}", nn.ParameterDict())
        self.configs: dict[str, LoraConfig] = {}

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
        return list(self.configs)

    def lora_a(self, pair: str) -> nn.ParameterDict:
        return getattr(self, f"lora_A_{pair}")

    def lora_b(self, pair: str) -> nn.ParameterDict:
        return getattr(self, f"lora_B_{pair}")

    def pairs(self, name: str) -> list[str]:
        """The pairs adapter ``name`` holds, in :data:`PAIRS` order."""
        return [p for p in PAIRS if name in self.lora_a(p)]

    def add_adapter(self, name: str, config: LoraConfig, *, parts: set[str] | None = None) -> None:
        """Create adapter ``name`` on ``parts`` (default all of gate_proj, up_proj, down_proj).

        Calling again for an existing name adds the new parts and re-initialises the adapter.
        """
        parts = set(parts or layout.EXPERT_PROJS)
        if not parts <= set(layout.EXPERT_PROJS):
            raise AdapterError(f"experts: unknown parts {sorted(parts - set(layout.EXPERT_PROJS))}; "
                               f"allowed: {', '.join(layout.EXPERT_PROJS)}")
        if config.use_dora:
            raise AdapterError("use_dora is not supported on routed experts yet (supported on linears)")
        if config.init not in ("kaiming", "gaussian"):
            raise AdapterError(f"init={config.init!r} is not supported on routed experts yet "
                               "(allowed there: kaiming, gaussian)")
        if name in self.configs:
            parts |= {p for pair in self.pairs(name) for p in _parts_of(pair)}
            self.delete_adapter(name)
        gate, up = "gate_proj" in parts, "up_proj" in parts
        pairs = (["gate_up"] if gate and up else ["gate"] if gate else ["up"] if up else [])
        pairs += ["down"] if "down_proj" in parts else []
        self.configs[name] = config
        for pair in pairs:
            self._new_pair(name, pair, config.r)
        if not self.active:
            self.active.append(name)

    def _new_pair(self, name: str, pair: str, rank: int) -> None:
        config = self.configs[name]
        d_in, d_out = self._dims(pair)
        lead = () if config.expert_rank == "shared" else (self.num_experts,)
        device = self.base_layer.gate_up_proj.device
        a = torch.empty(*lead, rank, d_in, dtype=torch.float32, device=device)
        if config.init == "kaiming":  # per expert = on the (E*r, in) view: fan_in is `in` either way
            nn.init.kaiming_uniform_(a.view(-1, d_in), a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1 / rank)
        self.lora_a(pair)[name] = nn.Parameter(a)
        self.lora_b(pair)[name] = nn.Parameter(torch.zeros(*lead, d_out, rank, dtype=torch.float32, device=device))

    def _dims(self, pair: str) -> tuple[int, int]:
        D, Fh = self.dim, self.hidden
        return {"gate_up": (D, 2 * Fh), "gate": (D, Fh), "up": (D, Fh), "down": (Fh, D)}[pair]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        for pair in self.pairs(name):
            del self.lora_a(pair)[name], self.lora_b(pair)[name]
        self.configs.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        for pair in PAIRS:
            for kind, params in (("A", self.lora_a(pair)), ("B", self.lora_b(pair))):
                for key, p in params.items():
                    if name is None or key == name:
                        yield f"lora_{kind}_{pair}.{key}", p

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, offsets: torch.Tensor, *, token_index: torch.Tensor) -> torch.Tensor:
        """x (R, D) sorted by expert; offsets (E,) int32 cumulative ends; token_index (R,) -> (R, D)."""
        base = self.base_layer
        names = self.running()
        rows = {n: self._rows(n, token_index, x.dtype) for n in names}
        gate_up = base.linear(x, base.gate_up_proj, offsets)  # (R, 2F)
        Fh = self.hidden
        for n in names:
            fused, alone = _gate_up_groups(self.pairs(n))
            if fused:  # one pair over the 2F rows, or gate+up pairs with their A's in one grouped GEMM
                gate_up = gate_up + self._split_lora(n, fused, x, offsets, rows[n])
            for half in alone:  # zero-padded to 2F so the base path below stays bit-identical
                pad = (0, Fh) if half == "gate" else (Fh, 0)
                gate_up = gate_up + F.pad(self._split_lora(n, [half], x, offsets, rows[n]), pad)
        gate, up = gate_up.chunk(2, dim=-1)
        h = base.act(gate) * up  # (R, F)
        out = base.linear(h, base.down_proj, offsets)  # (R, D)
        for n in names:
            if "down" in self.pairs(n):
                out = out + self._split_lora(n, ["down"], h, offsets, rows[n])
        return out

    def _rows(self, name: str, token_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """(R, 1) 1/0 per routed row: does the row's sample use ``name``? None when all do."""
        samples = self.sample_mask(name, token_index.device)
        if samples is None:
            return None
        ctx = current_context()
        return samples[ctx.sample_of_token(token_index.device)][token_index].to(dtype).unsqueeze(-1)

    def _split_lora(self, name: str, pairs: list[str], x: torch.Tensor, offsets: torch.Tensor,
                    rows: torch.Tensor | None) -> torch.Tensor:
        """``s * B (A drop(x))`` per expert for ``pairs`` sharing input x; outputs concatenated."""
        config = self.configs[name]
        h = F.dropout(x, config.dropout, self.training) if config.dropout else x
        a_list = [self.lora_a(p)[name].to(x.dtype) for p in pairs]
        t = self._matmul(h, a_list[0] if len(a_list) == 1 else torch.cat(a_list, dim=-2), offsets)  # (R, r)
        t = t * (config.scaling if rows is None else rows * config.scaling)
        b_list = [self.lora_b(p)[name] for p in pairs]
        parts = t.split([b.shape[-1] for b in b_list], dim=-1) if len(pairs) > 1 else [t]
        outs = [self._matmul(tp, b.to(x.dtype), offsets) for tp, b in zip(parts, b_list)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w) if w.dim() == 2 else self.base_layer.linear(x, w, offsets)

    # --- merge ----------------------------------------------------------------------------
    def delta(self, name: str, pair: str) -> torch.Tensor:
        """fp32 ``s * B_e @ A_e`` for every expert, (E, out, in). Merging only, never the forward."""
        a, b = self.lora_a(pair)[name], self.lora_b(pair)[name]
        d = (b @ a).expand(self.num_experts, -1, -1) if a.dim() == 2 else torch.bmm(b, a)
        return d * self.configs[name].scaling

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

    # --- files ----------------------------------------------------------------------------
    def _targeted(self, names: list[str]) -> list[str]:
        return [p for p in layout.PROJ_PARAMS if any(PROJ_OF_PAIR[q] == p for n in names for q in self.pairs(n))]

    def peft_config_targets(self, module_path: str, name: str | None = None) -> dict:
        """PEFT adapter_config entries: ``target_parameters``, plus rank/alpha patterns when
        adapter ``name`` holds separate gate and up pairs (exported as one rank-2r pair)."""
        names = [name] if name is not None else self.adapter_names
        out: dict = {"target_parameters": [f"{module_path}.{p}" for p in self._targeted(names)]}
        if name is not None and {"gate", "up"} <= set(self.pairs(name)):
            config = self.configs[name]
            rank = self.lora_a("gate")[name].shape[-2] + self.lora_a("up")[name].shape[-2]
            key = f"{module_path}.gate_up_proj"
            out["rank_pattern"] = {key: rank}
            out["alpha_pattern"] = {key: config.scaling * (math.sqrt(rank) if config.use_rslora else rank)}
        return out

    def _full(self, name: str, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached fp32 pair with the expert dim: (E, r, in), (E, out, r)."""
        a, b = self.lora_a(pair)[name].detach(), self.lora_b(pair)[name].detach()
        if a.dim() == 2:
            a, b = a.expand(self.num_experts, -1, -1), b.expand(self.num_experts, -1, -1)
        return a, b

    def _proj_pairs(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One (a, b) per targeted 3D parameter, gate_up as PEFT sees it (over the fused 2F rows)."""
        pairs, out = self.pairs(name), {}
        if "gate_up" in pairs:
            out["gate_up_proj"] = self._full(name, "gate_up")
        elif "gate" in pairs or "up" in pairs:
            halves = [self._full(name, h) if h in pairs else None for h in ("gate", "up")]
            a, b = next(p for p in halves if p is not None)
            empty = (a[:, :0], torch.zeros_like(b[..., :0]))  # the untargeted half: rank 0, rows zero
            out["gate_up_proj"] = layout.block_diag_pairs([p if p is not None else empty for p in halves])
        if "down" in pairs:
            out["down_proj"] = self._full(name, "down")
        return out

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        prefixes = layout.peft_prefixes(self._targeted([name]))
        out = {}
        for proj, (a, b) in self._proj_pairs(name).items():
            out[f"{prefixes[proj]}lora_A.weight"], out[f"{prefixes[proj]}lora_B.weight"] = layout.to_peft(a, b)
        return out

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        prefixes = layout.peft_prefixes(self._targeted([name]))
        _check_keys(tensors, {f"{prefixes[p]}lora_{k}.weight" for p in prefixes for k in "AB"}, where)
        Fh, E = self.hidden, self.num_experts
        for proj, (a0, b0) in self._proj_pairs(name).items():
            ka, kb = f"{prefixes[proj]}lora_A.weight", f"{prefixes[proj]}lora_B.weight"
            layout.check_shape(tensors[ka], (E * a0.shape[1], a0.shape[2]), where=where, key=ka)
            layout.check_shape(tensors[kb], (b0.shape[1], E * b0.shape[2]), where=where, key=kb)
            a, b = layout.from_peft(tensors[ka], tensors[kb], E)
            if proj == "down_proj" or "gate_up" in self.pairs(name):
                self._set(name, "down" if proj == "down_proj" else "gate_up", a, b, where, ka)
                continue
            col = 0
            for half, rows in (("gate", slice(0, Fh)), ("up", slice(Fh, 2 * Fh))):
                r = self.lora_a(half)[name].shape[-2] if half in self.pairs(name) else 0
                other = slice(Fh, 2 * Fh) if half == "gate" else slice(0, Fh)
                layout.check_zero(b[:, other, col:col + r], where=where, what=f"'{kb}' outside the {half} block")
                if r:
                    self._set(name, half, a[:, col:col + r], b[:, rows, col:col + r], where, ka)
                col += r

    def _set(self, name: str, pair: str, a: torch.Tensor, b: torch.Tensor, where: str, key: str) -> None:
        pa, pb = self.lora_a(pair)[name], self.lora_b(pair)[name]
        if pa.dim() == 2:
            a, b = layout.shared_from(a, where=where, key=key), layout.shared_from(b, where=where, key=key)
        with torch.no_grad():
            pa.copy_(a)
            pb.copy_(b)

    def per_expert_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """vLLM/SGLang layout: ``{e}.{gate_proj|up_proj|down_proj}.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r)."""
        out = {}
        for proj, (a, b) in self._per_proj(name).items():
            for e in range(self.num_experts):
                ka, kb = layout.per_expert_keys(e, proj)
                out[ka], out[kb] = a[e].contiguous(), b[e].contiguous()
        return out

    def _per_proj(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pairs, Fh, out = self.pairs(name), self.hidden, {}
        if "gate_up" in pairs:  # a fused pair is a gate pair and an up pair sharing A: exact at rank r
            a, b = self._full(name, "gate_up")
            out["gate_proj"], out["up_proj"] = (a, b[:, :Fh]), (a, b[:, Fh:])
        for pair, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            if pair in pairs:
                out[proj] = self._full(name, pair)
        return dict(sorted(out.items(), key=lambda kv: layout.EXPERT_PROJS.index(kv[0])))

    def load_per_expert_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Inverse of :meth:`per_expert_tensors`. Gate and up pairs with different A's turn a fused
        gate_up pair into separate gate and up pairs (call before building the optimizer)."""
        projs = {p: ab[0].shape for p, ab in self._per_proj(name).items()}
        _check_keys(tensors, {k for p in projs for e in range(self.num_experts) for k in layout.per_expert_keys(e, p)}, where)
        stacks = {p: layout.split_per_expert(tensors, p, self.num_experts, where=where) for p in projs}
        for proj, (a, b) in stacks.items():
            r, (d_in, d_out) = projs[proj][1], self._dims(proj.removesuffix("_proj"))
            layout.check_shape(a, (self.num_experts, r, d_in), where=where, key=f"*.{proj}.lora_A.weight")
            layout.check_shape(b, (self.num_experts, d_out, r), where=where, key=f"*.{proj}.lora_B.weight")
        if "gate_up" in self.pairs(name):
            (ag, bg), (au, bu) = stacks.pop("gate_proj"), stacks.pop("up_proj")
            if torch.equal(ag, au):
                self._set(name, "gate_up", ag, torch.cat([bg, bu], dim=1), where, "*.gate_proj.lora_A.weight")
            else:
                del self.lora_a("gate_up")[name], self.lora_b("gate_up")[name]
                for half, (a, b) in (("gate", (ag, bg)), ("up", (au, bu))):
                    self._new_pair(name, half, a.shape[1])
                    self._set(name, half, a, b, where, f"*.{half}_proj.lora_A.weight")
        for proj, (a, b) in stacks.items():
            self._set(name, proj.removesuffix("_proj"), a, b, where, f"*.{proj}.lora_A.weight")


def _gate_up_groups(pairs: list[str]) -> tuple[list[str], list[str]]:
    """Split an adapter's gate/up pairs into those added to the fused 2F output and lone halves."""
    if "gate_up" in pairs:
        return ["gate_up"], []
    halves = [p for p in ("gate", "up") if p in pairs]
    return (halves, []) if len(halves) == 2 else ([], halves)


def _parts_of(pair: str) -> tuple[str, ...]:
    return ("gate_proj", "up_proj") if pair == "gate_up" else (f"{pair}_proj",)


def _check_keys(tensors: dict[str, torch.Tensor], expected: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if unexpected:
        raise AdapterError(f"{where}: tensor(s) {unexpected} map to nothing in this experts adapter "
                           f"(expected {sorted(expected)})")
    if missing:
        raise AdapterError(f"{where}: missing tensor(s) {missing}")


register_wrapper(GroupedExperts, LoraGroupedExperts)
