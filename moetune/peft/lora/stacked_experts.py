"""Several adapters on routed experts in one batch: every adapter's product as one grouped GEMM per side.

When the samples of a batch choose adapters (``adapter_names``), each routed row belongs to one
expert and one adapter slot (see :class:`~..core.selection.SampleRuns`). Sorting each expert's rows
by slot - a permutation inside each expert's range, so the base's offsets still hold - makes every
(expert, slot) pair a contiguous group. Stacking the adapters' pairs per expert into (E*S, r, in)
and (E*S, out, r) weights (zeros for a slot whose adapter does not run or lacks the pair, ranks
padded with zero rows, each B times its adapter's scaling) turns all adapters' low-rank products
into two grouped GEMMs over the E*S groups, on the same rows as the base's.

The other way (:class:`~..core.selection.ExpertBlocks`) regroups the rows by adapter for each delta:
a gather, a concatenation and a scatter-add of (R, D)-sized tensors for gate_up and again for down,
forward and backward. Here the rows move twice per layer (sorted, then put back) and only the small
weights are copied. Four adapters of 2 x 256 tokens (``bench/multi_adapter.py``): the forward saves
220 instead of 256 MiB for backward in fp32 (124 instead of 156 in bf16) and a step runs 8% fewer
ops; CPU step time stayed within the noise.

Taken when every running adapter holds a fused ``gate_up`` pair and/or a ``down`` pair and all share
one dropout; separate gate/up halves take the regrouping path.

Legend: R routed rows, E experts, S adapter slots of the batch, r the largest rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...model.moe import gather_rows
from ..core.layer import AdapterLayer
from .experts_layout import PROJ_OF_PAIR

# ``layer`` below is a LoraGroupedExperts (importing it here would make a cycle): its adapters,
# pairs, stores and base experts

STACKABLE = frozenset({"gate_up", "down"})


def stacked_slots(layer: AdapterLayer, names: list[str]) -> list[str | None] | None:
    """The adapter of each slot of this batch (None: no adapter, or one that does not run here)
    when the stacked path applies, else None."""
    runs = layer.selection().runs
    if runs is None or not names or len(runs.runs) == 1:
        return None
    if any(not set(layer.pairs(n)) <= STACKABLE for n in names):
        return None
    if len({layer.adapters[n].config.dropout for n in names}) > 1:
        return None
    slots = [n if n in names else None for n in runs.names]
    return slots + [None] if runs.tokens_per_slot()[-1] else slots


def stacked_experts(layer: AdapterLayer, x: torch.Tensor, offsets: torch.Tensor, token_index, slots) -> torch.Tensor:
    """The experts' output (R, D) for expert-sorted rows x (R, D), every slot's adapter on its rows."""
    base = layer.base_layer
    order, groups = _slot_order(layer.selection().slot_of_token, token_index, offsets, len(slots))
    xs = gather_rows(x, order)
    gate_up = base.project_gate_up(xs, offsets)
    gate_up = _add_products(layer, slots, "gate_up", gate_up, xs, groups)
    h = base.gated(gate_up)
    out = _add_products(layer, slots, "down", base.project_down(h, offsets), h, groups)
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=order.device))
    return gather_rows(out, inverse)


def _slot_order(slot_of_token: torch.Tensor, token_index: torch.Tensor, offsets: torch.Tensor, slots: int):
    """Rows sorted by (expert, slot), stably: (R,) where each sorted row comes from, and the
    (E*S,) int32 cumulative ends of the groups. Built on the device, no host sync."""
    rows = torch.arange(token_index.shape[0], device=offsets.device, dtype=offsets.dtype)
    expert = torch.searchsorted(offsets, rows, right=True)
    key = expert * slots + slot_of_token.index_select(0, token_index)
    sorted_key, order = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(offsets.shape[0] * slots, device=key.device), right=True)
    return order, ends.to(torch.int32)


def _add_products(layer, slots, pair: str, y: torch.Tensor, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``y`` plus each row's adapter's ``s * B_e (A_e drop(x))`` for ``pair``, as two grouped GEMMs."""
    holders = [n for n in slots if n is not None and pair in layer.pairs(n)]
    if not holders:
        return y
    a, b = _stacked_pair(layer, slots, pair, x.dtype)
    dropout = layer.adapters[holders[0]].config.dropout
    h = F.dropout(x, dropout) if dropout and layer.training else x
    return y + layer.base_layer.linear(layer.base_layer.linear(h, a, groups), b, groups)


def _stacked_pair(layer, slots, pair: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(E*S, r, in) A and (E*S, out, r) s*B, expert-major: group e*S + s is slot s's pair of expert e."""
    E, (d_in, d_out) = layer.num_experts, layer.dims(pair)
    held = {
        n: (layer.adapters[n].effective_a(layer, pair), layer.lora_b(pair)[n])
        for n in slots
        if n is not None and pair in layer.pairs(n)
    }
    rank = max(a.shape[-2] for a, _ in held.values())
    device = next(iter(held.values()))[0].device
    a_parts, b_parts = [], []
    for n in slots:
        if n not in held:  # zero products for its rows
            a_parts.append(torch.zeros(E, rank, d_in, dtype=dtype, device=device))
            b_parts.append(torch.zeros(E, d_out, rank, dtype=dtype, device=device))
            continue
        a, b = held[n]
        s = layer.adapters[n].scaling(PROJ_OF_PAIR[pair])
        a = a.to(dtype).expand(E, -1, -1) if a.dim() == 2 else a.to(dtype)  # shared rank: one pair for all
        b = (b.to(dtype) * s).expand(E, -1, -1) if b.dim() == 2 else b.to(dtype) * s
        a_parts.append(F.pad(a, (0, 0, 0, rank - a.shape[-2])))
        b_parts.append(F.pad(b, (0, rank - b.shape[-1])))
    stack = len(slots)
    return torch.stack(a_parts, 1).view(E * stack, rank, d_in), torch.stack(b_parts, 1).view(E * stack, d_out, rank)
