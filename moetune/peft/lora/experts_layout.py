"""Adapter-file layouts of expert LoRA pairs: PEFT ``target_parameters`` and per-expert (vLLM).

Legend: E experts, r rank, D model dim, F expert hidden; ours ``a`` (E, r, in), ``b`` (E, out, r).

PEFT 0.21 on transformers-5 fused experts (pinned by tests/test_lora_experts.py against the real
package) wraps each targeted 3D parameter in a ``ParamWrapper``, nested in the order the experts
module registers its parameters: ``gate_up_proj`` innermost, ``down_proj`` outside it. The key of
a parameter's pair carries one ``base_layer.`` per wrapper outside it and never the parameter
name, so with both targeted::

    <experts>.base_layer.lora_A.weight  (E*r, D)     gate_up_proj
    <experts>.base_layer.lora_B.weight  (2F, r*E)    gate_up_proj (gate rows first)
    <experts>.lora_A.weight             (E*r, F)     down_proj
    <experts>.lora_B.weight             (D, r*E)     down_proj

and with only one of them targeted, that one is the outer ``<experts>.lora_A.weight``. A is
expert-slowest (row ``e*r + i``), B expert-fastest (column ``i*E + e``).

The per-expert layout that vLLM and SGLang read has 2D keys per expert and projection,
``<experts>.{e}.gate_proj.lora_A.weight`` (r, D) and ``...lora_B.weight`` (F, r).
"""

from __future__ import annotations

import math

import torch

from ...errors import AdapterError

PROJ_OF_PAIR = {"gate_up": "gate_up_proj", "gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}
PROJ_PARAMS = ("gate_up_proj", "down_proj")  # registration order in GroupedExperts (= PEFT nesting)
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def peft_prefixes(targeted: list[str]) -> dict[str, str]:
    """Key prefix of each targeted 3D parameter: one ``base_layer.`` per PEFT wrapper outside it."""
    ordered = [p for p in PROJ_PARAMS if p in targeted]
    return {p: "base_layer." * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}


def to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, r, in), (E, out, r) -> PEFT's A (E*r, in) expert-slowest and B (out, r*E) expert-fastest
    (new tensors: never views of the parameters)."""
    E, r, _ = a.shape
    return a.reshape(E * r, -1).clone(), b.permute(1, 2, 0).reshape(b.shape[1], r * E).clone()


def from_peft(a2: torch.Tensor, b2: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_peft`."""
    E = num_experts
    a = a2.reshape(E, a2.shape[0] // E, a2.shape[1])
    b = b2.reshape(b2.shape[0], b2.shape[1] // E, E).permute(2, 0, 1)
    return a, b


def block_diag_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several pairs on stacked outputs as one pair: A stacked on rank, B block-diagonal.

    ``B_bd @ A_cat`` equals the row-stack of the ``B_i @ A_i``, so it is exact (rank = sum of ranks).
    """
    a = torch.cat([a for a, _ in pairs], dim=-2)
    outs, ranks = [b.shape[-2] for _, b in pairs], [b.shape[-1] for _, b in pairs]
    b = pairs[0][1].new_zeros(pairs[0][1].shape[0], sum(outs), sum(ranks))
    row = col = 0
    for (_, bi), o, r in zip(pairs, outs, ranks):
        b[:, row:row + o, col:col + r] = bi
        row, col = row + o, col + r
    return a, b


def per_expert_keys(e: int, proj: str) -> tuple[str, str]:
    return f"{e}.{proj}.lora_A.weight", f"{e}.{proj}.lora_B.weight"


def split_per_expert(tensors: dict[str, torch.Tensor], proj: str, num_experts: int, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``{e}.{proj}.lora_A/B.weight`` over experts -> (E, r, in), (E, out, r)."""
    a_list, b_list = [], []
    for e in range(num_experts):
        ka, kb = per_expert_keys(e, proj)
        for key in (ka, kb):
            if key not in tensors:
                raise AdapterError(f"{where}: missing tensor '{key}' for expert {e} of {num_experts}")
        a_list.append(tensors[ka])
        b_list.append(tensors[kb])
    try:
        return torch.stack(a_list), torch.stack(b_list)
    except RuntimeError as err:
        raise AdapterError(f"{where}: per-expert {proj} tensors differ in shape across experts ({err})") from None


def check_shape(t: torch.Tensor, shape: tuple[int, ...], *, where: str, key: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise AdapterError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_zero(t: torch.Tensor, *, where: str, what: str) -> None:
    if t.numel() and t.abs().max().item() != 0:
        raise AdapterError(f"{where}: {what} is non-zero, which this adapter cannot represent")


def shared_from(t: torch.Tensor, *, where: str, key: str) -> torch.Tensor:
    """(E, ...) -> (...) for expert_rank='shared'; every expert must hold the same tensor."""
    if not torch.equal(t, t[:1].expand_as(t)):
        raise AdapterError(f"{where}: tensor '{key}' differs across experts, but the adapter uses "
                           f"expert_rank='shared' (one pair for all experts); use expert_rank='per_expert'")
    return t[0]


def check_keys(tensors: dict[str, torch.Tensor], expected: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if unexpected:
        raise AdapterError(f"{where}: tensor(s) {unexpected} map to nothing in this experts adapter "
                           f"(expected {sorted(expected)})")
    if missing:
        raise AdapterError(f"{where}: missing tensor(s) {missing}")


class ExpertLayoutMixin:
    """File layouts of :class:`~moetune.peft.experts.LoraGroupedExperts` (PEFT and per-expert).

    Uses the layer's ``pairs``, ``lora_a``/``lora_b``, ``configs``, ``param_configs``, ``merged``,
    ``_new_pair`` and ``_dims``. Loading copies into existing fp32 parameters (any file dtype), so create the adapter
    with the file's config first; a shape or key mismatch is an AdapterError naming ``where``.
    """

    def _targeted(self, names: list[str]) -> list[str]:
        return [p for p in PROJ_PARAMS if any(PROJ_OF_PAIR[q] == p for n in names for q in self.pairs(n))]

    def peft_config_targets(self, module_path: str, name: str | None = None) -> dict:
        """PEFT adapter_config entries: ``target_parameters`` and, for adapter ``name``, the rank
        and alpha of each targeted parameter as ``rank_pattern``/``alpha_pattern`` entries (separate
        gate and up pairs are written as one pair of their summed rank, alpha keeping the scale)."""
        names = [name] if name is not None else self.adapter_names
        targeted = self._targeted(names)
        out: dict = {"target_parameters": [f"{module_path}.{p}" for p in targeted]}
        if name is not None:
            out["rank_pattern"], out["alpha_pattern"] = {}, {}
            for param, (a, _) in self._proj_pairs(name).items():
                cfg, rank = self.param_configs[name][param], a.shape[-2]
                ratio = rank / cfg.r
                out["rank_pattern"][f"{module_path}.{param}"] = rank
                out["alpha_pattern"][f"{module_path}.{param}"] = cfg.alpha * (math.sqrt(ratio) if cfg.use_rslora else ratio)
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
            out["gate_up_proj"] = block_diag_pairs([p if p is not None else empty for p in halves])
        if "down" in pairs:
            out["down_proj"] = self._full(name, "down")
        return out

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        prefixes = peft_prefixes(self._targeted([name]))
        out = {}
        for proj, (a, b) in self._proj_pairs(name).items():
            out[f"{prefixes[proj]}lora_A.weight"], out[f"{prefixes[proj]}lora_B.weight"] = to_peft(a, b)
        return out

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        self._check_loadable(name, where)
        prefixes = peft_prefixes(self._targeted([name]))
        check_keys(tensors, {f"{prefixes[p]}lora_{k}.weight" for p in prefixes for k in "AB"}, where)
        Fh, E = self.hidden, self.num_experts
        for proj, (a0, b0) in self._proj_pairs(name).items():
            ka, kb = f"{prefixes[proj]}lora_A.weight", f"{prefixes[proj]}lora_B.weight"
            check_shape(tensors[ka], (E * a0.shape[1], a0.shape[2]), where=where, key=ka)
            check_shape(tensors[kb], (b0.shape[1], E * b0.shape[2]), where=where, key=kb)
            a, b = from_peft(tensors[ka], tensors[kb], E)
            if proj == "down_proj" or "gate_up" in self.pairs(name):
                self._set(name, "down" if proj == "down_proj" else "gate_up", a, b, where, ka)
                continue
            col = 0
            for half, rows in (("gate", slice(0, Fh)), ("up", slice(Fh, 2 * Fh))):
                r = self.lora_a(half)[name].shape[-2] if half in self.pairs(name) else 0
                other = slice(Fh, 2 * Fh) if half == "gate" else slice(0, Fh)
                check_zero(b[:, other, col:col + r], where=where, what=f"'{kb}' outside the {half} block")
                if r:
                    self._set(name, half, a[:, col:col + r], b[:, rows, col:col + r], where, ka)
                col += r

    def _check_loadable(self, name: str, where: str) -> None:
        if name not in self.configs:
            raise AdapterError(f"{where}: no adapter '{name}' on this experts layer; add it first")
        if name in self.merged:
            raise AdapterError(f"{where}: adapter '{name}' is merged into the base weights; unmerge it first")

    def _set(self, name: str, pair: str, a: torch.Tensor, b: torch.Tensor, where: str, key: str) -> None:
        pa, pb = self.lora_a(pair)[name], self.lora_b(pair)[name]
        if pa.dim() == 2:
            a, b = shared_from(a, where=where, key=key), shared_from(b, where=where, key=key)
        with torch.no_grad():
            pa.copy_(a)
            pb.copy_(b)

    def per_expert_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """vLLM/SGLang layout: ``{e}.{gate_proj|up_proj|down_proj}.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r)."""
        out = {}
        for proj, (a, b) in self._per_proj(name).items():
            for e in range(self.num_experts):
                ka, kb = per_expert_keys(e, proj)
                out[ka], out[kb] = a[e].clone(), b[e].clone()  # own storage: gate and up share A
        return out

    def _per_proj(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pairs, Fh, out = self.pairs(name), self.hidden, {}
        if "gate_up" in pairs:  # a fused pair is a gate pair and an up pair sharing A: exact at rank r
            a, b = self._full(name, "gate_up")
            out["gate_proj"], out["up_proj"] = (a, b[:, :Fh]), (a, b[:, Fh:])
        for pair, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            if pair in pairs:
                out[proj] = self._full(name, pair)
        return dict(sorted(out.items(), key=lambda kv: EXPERT_PROJS.index(kv[0])))

    def load_per_expert_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Inverse of :meth:`per_expert_tensors`. Gate and up pairs with different A's turn a fused
        gate_up pair into separate gate and up pairs (call before building the optimizer)."""
        self._check_loadable(name, where)
        projs = {p: ab[0].shape for p, ab in self._per_proj(name).items()}
        check_keys(tensors, {k for p in projs for e in range(self.num_experts) for k in per_expert_keys(e, p)}, where)
        stacks = {p: split_per_expert(tensors, p, self.num_experts, where=where) for p in projs}
        for proj, (a, b) in stacks.items():
            r, (d_in, d_out) = projs[proj][1], self._dims(proj.removesuffix("_proj"))
            check_shape(a, (self.num_experts, r, d_in), where=where, key=f"*.{proj}.lora_A.weight")
            check_shape(b, (self.num_experts, d_out, r), where=where, key=f"*.{proj}.lora_B.weight")
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
