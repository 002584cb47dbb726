"""Adapter arithmetic: combine same-base LoRA adapters (PEFT-format state dicts) into one.

(Folding one adapter into the base weights is :mod:`moetune.peft.lora.fold`.)

Legend: n adapters, w_i their weights, s_i their scalings (alpha/r), E experts, r rank;
a linear's pair is A (r, in), B (out, r); a routed-experts pair in PEFT's ``target_parameters``
layout is A (E*r, in) expert-slowest, B (out, r*E) expert-fastest (see :mod:`moetune.peft.lora.experts_layout`).
Every expert is merged as if it were its own linear.

Methods, with PEFT's ``add_weighted_adapter`` semantics (peft/tuners/lora/model.py and
peft/utils/merge_utils.py, 0.21) wherever PEFT has the same name:

- on the factors (PEFT's default; all adapters of a module must share r): ``linear``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A's and, separately, the B's,
  with A_i weighted by ``sign(w_i s_i) sqrt|w_i s_i|`` and B_i by ``sqrt|w_i s_i|``. Cheap, but
  ``linear`` is not the weighted sum of the deltas (the cross terms B_i A_j appear);
- on the deltas ``D_i = s_i B_i A_i`` (the task vectors of the TIES/DARE papers) weighted by w_i,
  then a truncated SVD to ``rank`` (default: the largest input rank): ``svd`` (weighted sum),
  ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``;
- ``cat``: A's (times w_i s_i) and B's stacked along the rank, so ``B @ A = sum_i w_i D_i``
  exactly, at rank ``sum r_i``.

TIES: keep the ``density`` fraction of largest-magnitude entries of each tensor, elect each
entry's sign by the sign of the summed (unweighted, pruned) mass, and average the weighted
entries that agree with it. DARE: keep each entry with probability ``density`` and divide the
kept ones by ``density`` (= 1/(1-p)); the masks come from a generator seeded by ``seed`` and the
module's key, so a result does not depend on which other modules are merged.

The merged adapter has scaling 1, as PEFT's: write it with ``lora_alpha`` equal to its rank
(and ``use_rslora`` false).
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from ...errors import AdapterError
from ..lora.experts_layout import from_peft, to_peft

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = FACTOR_METHODS + DELTA_METHODS + ("cat",)
_PAIR_KEY = re.compile(r"^(?P<module>.*)lora_(?P<kind>[AB])\.weight$")
_EXPERTS = re.compile(r"(^|\.)experts\.(base_layer\.)*$")


def is_experts_prefix(prefix: str) -> bool:
    """Whether a key prefix (``...mlp.experts.[base_layer.]``) is a routed-experts pair's."""
    return _EXPERTS.search(prefix) is not None


# --- tensor functions (task tensors of one module, one expert) --------------------------------
def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries, zero the rest."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view(t.shape)


def random_masks(tensors: list[torch.Tensor], density: float, generator: torch.Generator) -> list[torch.Tensor]:
    """DARE keep-masks, drawn in order: ``torch.rand(shape, generator) < density``."""
    return [torch.rand(t.shape, generator=generator) < density for t in tensors]


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """(n, ...) -> bool (n, ...): entries whose sign equals the elected sign (ties elect +)."""
    mass = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    return stacked.sign() == torch.where(mass >= 0, 1.0, -1.0)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over adapters of the weighted entries the mask keeps (0 where none is kept)."""
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1)


def combine(
    tensors: list[torch.Tensor],
    weights: list[float],
    method: str,
    *,
    density: float | None = None,
    masks: list[torch.Tensor] | None = None,
    sign_method: str = "total",
) -> torch.Tensor:
    """Combine same-shape task tensors by ``method`` (without the ``_svd`` suffix).

    DARE methods need ``masks`` (see :func:`random_masks`); density >= 1 prunes nothing, as PEFT.
    """
    if method in ("ties", "magnitude_prune") and density < 1:
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method.startswith("dare") and density < 1:
        tensors = [t * m / density for t, m in zip(tensors, masks)]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, sign_method))
    return weighted.sum(0)


# --- adapters ---------------------------------------------------------------------------------
def _modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Key prefix -> (A, B) of every LoRA pair; any other tensor is an error."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _PAIR_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"cannot merge tensor '{key}': only plain LoRA pairs (lora_A/lora_B) can be "
                "merged (DoRA magnitudes, embeddings and saved modules are not)"
            )
        found.setdefault(m.group("module"), {})[m.group("kind")] = t
    for module, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"'{module}lora_{'B' if 'A' in pair else 'A'}.weight' is missing (half a LoRA pair)")
    return {module: (pair["A"], pair["B"]) for module, pair in found.items()}


def _expert_view(
    module: str, a: torch.Tensor, b: torch.Tensor, num_experts: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, r, in), (E, out, r) fp32; a linear is one expert."""
    if not _EXPERTS.search(module):
        return a.float()[None], b.float()[None]
    if num_experts is None:
        raise AdapterError(f"'{module}lora_A.weight' is a routed-experts pair; pass num_experts to merge it")
    if a.shape[0] % num_experts or b.shape[1] % num_experts:
        raise AdapterError(
            f"'{module}lora_A.weight' {tuple(a.shape)} / lora_B {tuple(b.shape)} do not split "
            f"into {num_experts} experts"
        )
    return from_peft(a.float(), b.float(), num_experts)


def _module_seed(seed: int, module: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63)


def combine_adapters(
    states: list[dict[str, torch.Tensor]],
    weights: list[float],
    method: str,
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    scalings: list[float] | None = None,
    num_experts: int | None = None,
    majority_sign_method: str = "total",
) -> dict[str, torch.Tensor]:
    """Merge PEFT-format adapter tensors of the same base model into one adapter.

    Args:
        states: one ``{key: tensor}`` per adapter (``...lora_A.weight`` (r, in) /
            ``...lora_B.weight`` (out, r); experts in PEFT's layout). A module present in only
            some adapters is merged from those (as PEFT does).
        weights: one per adapter; negative weights subtract.
        method: one of :data:`METHODS`.
        density: fraction kept by ties/dare/magnitude_prune methods, in [0, 1].
        rank: output rank of the ``*svd`` methods (default: the largest input rank).
        seed: seeds the DARE masks.
        scalings: each adapter's ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA); default 1.
        num_experts: E, needed when a state holds routed-experts pairs.
        majority_sign_method: ``total`` (summed mass) or ``frequency`` (count of signs).

    Returns:
        ``{key: tensor}`` of the merged adapter (scaling 1), in the first state's dtype.
    """
    scalings = list(scalings) if scalings is not None else [1.0] * len(states)
    _check_args(states, weights, scalings, method, density, rank, majority_sign_method)
    parsed = [_modules(s) for s in states]
    out: dict[str, torch.Tensor] = {}
    for module in dict.fromkeys(m for p in parsed for m in p):
        members = [(p[module], w, s) for p, w, s in zip(parsed, weights, scalings) if module in p]
        dtype = members[0][0][0].dtype
        pairs = [_expert_view(module, a, b, num_experts) for (a, b), _, _ in members]
        gen = torch.Generator().manual_seed(_module_seed(seed, module))
        a, b = _merge_module(
            module, pairs, [(w, s) for _, w, s in members], method, density, rank, gen, majority_sign_method
        )
        if _EXPERTS.search(module):
            a, b = to_peft(a, b)
        else:
            a, b = a[0], b[0]
        out[f"{module}lora_A.weight"], out[f"{module}lora_B.weight"] = a.to(dtype), b.to(dtype)
    return out


def _merge_module(
    module: str,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    ws_s: list[tuple[float, float]],
    method: str,
    density: float | None,
    rank: int | None,
    gen: torch.Generator,
    sign_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (E, r_i, in) / (E, out, r_i), (w_i, s_i) -> merged (E, r', in), (E, out, r')."""
    ws = [w * s for w, s in ws_s]
    if method == "cat":
        return (torch.cat([w * a for (a, _), w in zip(pairs, ws)], dim=1), torch.cat([b for _, b in pairs], dim=2))
    E = pairs[0][0].shape[0]
    if method in FACTOR_METHODS:
        ranks = sorted({a.shape[1] for a, _ in pairs})
        if len(ranks) > 1:
            raise AdapterError(
                f"'{module}': method '{method}' needs one rank across adapters, got {ranks}; "
                "use 'cat' or an '*svd' method"
            )
        wa = [math.copysign(math.sqrt(abs(w)), w) for w in ws]  # the sign on A only, as PEFT
        wb = [math.sqrt(abs(w)) for w in ws]
        merged_a, merged_b = [], []
        for e in range(E):
            a_list, b_list = [a[e] for a, _ in pairs], [b[e] for _, b in pairs]
            masks_a = random_masks(a_list, density, gen) if method.startswith("dare") else None
            masks_b = random_masks(b_list, density, gen) if method.startswith("dare") else None
            merged_a.append(combine(a_list, wa, method, density=density, masks=masks_a, sign_method=sign_method))
            merged_b.append(combine(b_list, wb, method, density=density, masks=masks_b, sign_method=sign_method))
        return torch.stack(merged_a), torch.stack(merged_b)
    base = method.removesuffix("_svd")
    # The task vectors carry their scaling (the sign election sees s_i D_i); weights are the w_i.
    deltas = [s * torch.bmm(b, a) for (a, b), (_, s) in zip(pairs, ws_s)]  # (E, out, in) each
    merged = []
    for e in range(E):
        d_list = [d[e] for d in deltas]
        masks = random_masks(d_list, density, gen) if base.startswith("dare") else None
        merged.append(
            combine(
                d_list,
                [w for w, _ in ws_s],
                "linear" if base == "svd" else base,
                density=density,
                masks=masks,
                sign_method=sign_method,
            )
        )
    return _refactor(torch.stack(merged), rank or max(a.shape[1] for a, _ in pairs))


def _refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD per expert: (E, out, in) -> A = Vh_r (E, r, in), B = U_r S_r (E, out, r).

    A rank above min(out, in) is padded with zero directions, so every module keeps ``rank``.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[-1])
    a, b = vh[:, :k], u[:, :, :k] * s[:, None, :k]
    if k < rank:
        a = torch.cat([a, a.new_zeros(a.shape[0], rank - k, a.shape[2])], dim=1)
        b = torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], rank - k)], dim=2)
    return a, b


def _check_args(states, weights, scalings, method, density, rank, sign_method) -> None:
    if method not in METHODS:
        raise AdapterError(f"method={method!r} is not a merge method (allowed: {', '.join(METHODS)})")
    if not states:
        raise AdapterError("merge_adapters needs at least one adapter")
    if len(weights) != len(states) or len(scalings) != len(states):
        raise AdapterError(
            f"weights ({len(weights)}) and scalings ({len(scalings)}) must match the number of adapters ({len(states)})"
        )
    needs_density = method.startswith(("ties", "dare", "magnitude_prune"))
    if needs_density and (density is None or not 0 <= density <= 1):
        raise AdapterError(f"method '{method}' needs density in [0, 1], got {density!r}")
    if rank is not None and (method not in DELTA_METHODS or rank < 1):
        raise AdapterError(
            f"rank={rank!r}: an output rank >= 1 applies to the *svd methods only ({', '.join(DELTA_METHODS)})"
        )
    if sign_method not in ("total", "frequency"):
        raise AdapterError(f"majority_sign_method={sign_method!r} (allowed: total, frequency)")
