"""Adapter-file layouts of expert LoRA pairs: PEFT ``target_parameters`` and per-expert (vLLM).

Legend: E experts, r rank, D model dim, F expert hidden; ours ``a`` (E, r, in), ``b`` (E, out, r).

PEFT 0.21 on transformers-5 fused experts (pinned by tests/peft/test_lora_experts.py against the real
package) wraps each targeted 3D parameter in a ``ParamWrapper``, nested in the order the experts
module registers its parameters: ``gate_up_proj`` innermost, ``down_proj`` outside it. The key of
a parameter's pair carries one ``base_layer.`` per wrapper outside it and never the parameter
name, so with both targeted::

    <experts>.base_layer.lora_A.weight  (E*r, D)     gate_up_proj
    <experts>.base_layer.lora_B.weight  (2F, r*E)    gate_up_proj (gate rows first)
    <experts>.lora_A.weight             (E*r, F)     down_proj
    <experts>.lora_B.weight             (D, r*E)     down_proj

and with only one of them targeted, that one is the outer ``<experts>.lora_A.weight``. A is
expert-slowest (row ``e*r + i``), B expert-fastest (column ``i*E + e``). Where the Hugging Face
tensor interleaves gate and up columns (gpt-oss's transposed ``(E, D, 2F)``), so do the rows of
PEFT's gate_up B (gate_0, up_0, gate_1, ...); ours are gate-first and converted here.

The per-expert layout that vLLM and SGLang read has 2D keys per expert and projection,
``<experts>.{e}.gate_proj.lora_A.weight`` (r, D) and ``...lora_B.weight`` (F, r).

The functions taking a ``layer`` are the file half of
:class:`~moetune.peft.lora.experts.LoraGroupedExperts` (its methods of the same names call
them). Loading copies into existing fp32 parameters (any file dtype), so create the adapter with
the file's config first; a shape or key mismatch is an AdapterError naming ``where``.
"""

from __future__ import annotations

import torch

from ...errors import AdapterError
from ...model.hf import deinterleave, interleave
from ..core.layer import AdapterLayer
from ..core.tensors import check_keys, check_shape

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
        b[:, row : row + o, col : col + r] = bi
        row, col = row + o, col + r
    return a, b


def gate_up_pair(pairs: list[str], pair_of) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's (E, r, D), (E, 2F, r) pair over the fused gate_up rows, from ``pair_of(p)`` of
    each pair it holds: the fused pair as it is, or its gate/up halves as their exact block-diagonal
    pair (a half it lacks: rank 0, rows zero)."""
    if "gate_up" in pairs:
        return pair_of("gate_up")
    halves = [pair_of(h) if h in pairs else None for h in ("gate", "up")]
    a, b = next(p for p in halves if p is not None)
    empty = (a[:, :0], torch.zeros_like(b[..., :0]))
    return block_diag_pairs([p if p is not None else empty for p in halves])


def per_expert_keys(e: int, proj: str) -> tuple[str, str]:
    return f"{e}.{proj}.lora_A.weight", f"{e}.{proj}.lora_B.weight"


def split_per_expert(
    tensors: dict[str, torch.Tensor], proj: str, num_experts: int, *, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
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


def check_zero(t: torch.Tensor, *, where: str, what: str) -> None:
    if t.numel() and t.abs().max().item() != 0:
        raise AdapterError(f"{where}: {what} is non-zero, which this adapter cannot represent")


def shared_from(t: torch.Tensor, *, where: str, key: str) -> torch.Tensor:
    """(E, ...) -> (...) for expert_rank='shared'; every expert must hold the same tensor."""
    if not torch.equal(t, t[:1].expand_as(t)):
        raise AdapterError(
            f"{where}: tensor '{key}' differs across experts, but the adapter uses "
            f"expert_rank='shared' (one pair for all experts); use expert_rank='per_expert'"
        )
    return t[0]


def targeted_params(layer: AdapterLayer, names: list[str]) -> list[str]:
    """The 3D parameters (in :data:`PROJ_PARAMS` order) that adapters ``names`` adapt."""
    return [p for p in PROJ_PARAMS if any(PROJ_OF_PAIR[q] == p for n in names for q in layer.pairs(n))]


def peft_config_targets(layer: AdapterLayer, module_path: str, name: str | None = None) -> dict:
    """PEFT adapter_config entries: ``target_parameters`` and, for adapter ``name``, the rank
    and alpha of each targeted parameter as ``rank_pattern``/``alpha_pattern`` entries (separate
    gate and up pairs are written as one pair of their summed rank, alpha keeping the scale)."""
    names = [name] if name is not None else layer.adapter_names
    out: dict = {"target_parameters": [f"{module_path}.{p}" for p in targeted_params(layer, names)]}
    if name is not None:
        out["rank_pattern"], out["alpha_pattern"] = {}, {}
        for param, (a, _) in proj_pairs(layer, name).items():
            rank, alpha = layer.adapters[name].file_rank_alpha(param, a.shape[-2])
            out["rank_pattern"][f"{module_path}.{param}"] = rank
            out["alpha_pattern"][f"{module_path}.{param}"] = alpha
    return out


def proj_pairs(layer: AdapterLayer, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One (a, b) per targeted 3D parameter, gate_up as PEFT sees it (over the fused 2F rows)."""
    pairs, out, adapter = layer.pairs(name), {}, layer.adapters[name]
    if any(p in pairs for p in ("gate_up", "gate", "up")):
        out["gate_up_proj"] = gate_up_pair(pairs, lambda p: adapter.file_pair(layer, p))
    if "down" in pairs:
        out["down_proj"] = adapter.file_pair(layer, "down")
    return out


def peft_tensors(layer: AdapterLayer, name: str) -> dict[str, torch.Tensor]:
    prefixes = peft_prefixes(targeted_params(layer, [name]))
    out = {}
    for proj, (a, b) in proj_pairs(layer, name).items():
        a2, b2 = to_peft(a, b)
        if proj == "gate_up_proj" and layer.base_layer.gate_up_interleaved:
            b2 = interleave(b2.T).T.contiguous()
        out[f"{prefixes[proj]}lora_A.weight"], out[f"{prefixes[proj]}lora_B.weight"] = a2, b2
    return out


def load_peft_tensors(layer: AdapterLayer, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
    check_loadable(layer, name, where)
    prefixes = peft_prefixes(targeted_params(layer, [name]))
    check_keys(tensors, {f"{prefixes[p]}lora_{k}.weight" for p in prefixes for k in "AB"}, where)
    E = layer.num_experts
    for proj, (a0, b0) in proj_pairs(layer, name).items():
        ka, kb = f"{prefixes[proj]}lora_A.weight", f"{prefixes[proj]}lora_B.weight"
        check_shape(tensors[ka], (E * a0.shape[1], a0.shape[2]), where=where, key=ka)
        check_shape(tensors[kb], (b0.shape[1], E * b0.shape[2]), where=where, key=kb)
        b2 = tensors[kb]
        if proj == "gate_up_proj" and layer.base_layer.gate_up_interleaved:
            b2 = deinterleave(b2.T).T
        a, b = from_peft(tensors[ka], b2, E)
        if proj == "down_proj" or "gate_up" in layer.pairs(name):
            set_pair(layer, name, "down" if proj == "down_proj" else "gate_up", a, b, where, ka)
        else:
            _load_halves(layer, name, a, b, where, ka, kb)


def _load_halves(
    layer: AdapterLayer, name: str, a: torch.Tensor, b: torch.Tensor, where: str, ka: str, kb: str
) -> None:
    """Separate gate and up pairs from PEFT's block-diagonal gate_up pair (off-blocks must be zero)."""
    Fh, col = layer.hidden, 0
    for half, rows in (("gate", slice(0, Fh)), ("up", slice(Fh, 2 * Fh))):
        r = layer.lora_a(half)[name].shape[-2] if half in layer.pairs(name) else 0
        other = slice(Fh, 2 * Fh) if half == "gate" else slice(0, Fh)
        check_zero(b[:, other, col : col + r], where=where, what=f"'{kb}' outside the {half} block")
        if r:
            set_pair(layer, name, half, a[:, col : col + r], b[:, rows, col : col + r], where, ka)
        col += r


def check_loadable(layer: AdapterLayer, name: str, where: str) -> None:
    if name not in layer.configs:
        raise AdapterError(f"{where}: no adapter '{name}' on this experts layer; add it first")
    if name in layer.merged:
        raise AdapterError(f"{where}: adapter '{name}' is merged into the base weights; unmerge it first")
    layer.adapters[name].check_loadable(where)


def set_pair(layer: AdapterLayer, name: str, pair: str, a: torch.Tensor, b: torch.Tensor, where: str, key: str) -> None:
    pa, pb = layer.lora_a(pair)[name], layer.lora_b(pair)[name]
    if pa.dim() == 2:
        a, b = shared_from(a, where=where, key=key), shared_from(b, where=where, key=key)
    with torch.no_grad():
        pa.copy_(a)
        pb.copy_(b)


def per_expert_tensors(layer: AdapterLayer, name: str) -> dict[str, torch.Tensor]:
    """vLLM/SGLang layout: ``{e}.{gate_proj|up_proj|down_proj}.lora_A.weight`` (r, in),
    ``...lora_B.weight`` (out, r)."""
    out = {}
    for proj, (a, b) in per_proj(layer, name).items():
        for e in range(layer.num_experts):
            ka, kb = per_expert_keys(e, proj)
            out[ka], out[kb] = a[e].clone(), b[e].clone()  # own storage: gate and up share A
    return out


def per_proj(layer: AdapterLayer, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs, Fh, out, adapter = layer.pairs(name), layer.hidden, {}, layer.adapters[name]
    if "gate_up" in pairs:  # a fused pair is a gate pair and an up pair sharing A: exact at rank r
        a, b = adapter.file_pair(layer, "gate_up")
        out["gate_proj"], out["up_proj"] = (a, b[:, :Fh]), (a, b[:, Fh:])
    for pair, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        if pair in pairs:
            out[proj] = adapter.file_pair(layer, pair)
    return dict(sorted(out.items(), key=lambda kv: EXPERT_PROJS.index(kv[0])))


def load_per_expert_tensors(layer: AdapterLayer, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
    """Inverse of :func:`per_expert_tensors`. Gate and up pairs with different A's turn a fused
    gate_up pair into separate gate and up pairs (call before building the optimizer)."""
    check_loadable(layer, name, where)
    E = layer.num_experts
    projs = {p: ab[0].shape for p, ab in per_proj(layer, name).items()}
    check_keys(tensors, {k for p in projs for e in range(E) for k in per_expert_keys(e, p)}, where)
    stacks = {p: split_per_expert(tensors, p, E, where=where) for p in projs}
    for proj, (a, b) in stacks.items():
        r, (d_in, d_out) = projs[proj][1], layer.dims(proj.removesuffix("_proj"))
        check_shape(a, (E, r, d_in), where=where, key=f"*.{proj}.lora_A.weight")
        check_shape(b, (E, d_out, r), where=where, key=f"*.{proj}.lora_B.weight")
    if "gate_up" in layer.pairs(name):
        (ag, bg), (au, bu) = stacks.pop("gate_proj"), stacks.pop("up_proj")
        if torch.equal(ag, au):
            set_pair(layer, name, "gate_up", ag, torch.cat([bg, bu], dim=1), where, "*.gate_proj.lora_A.weight")
        else:
            del layer.lora_a("gate_up")[name], layer.lora_b("gate_up")[name]
            for half, (a, b) in (("gate", (ag, bg)), ("up", (au, bu))):
                layer.adapters[name].new_pair(layer, half, a.shape[1])
                set_pair(layer, name, half, a, b, where, f"*.{half}_proj.lora_A.weight")
    for proj, (a, b) in stacks.items():
        set_pair(layer, name, proj.removesuffix("_proj"), a, b, where, f"*.{proj}.lora_A.weight")
