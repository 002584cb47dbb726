"""Several adapters on routed experts in one batch: every adapter's product as one grouped GEMM per side.

When the samples of a batch choose adapters (``adapter_names``), each routed row belongs to one
expert and one adapter slot (see :class:`~..core.selection.SampleRuns`). Sorting each expert's rows
by slot - a permutation inside each expert's range, so the base's offsets still hold - makes every
(expert, slot) pair a contiguous group. Stacking the adapters' pairs per expert into (E*S, r, in)
and (E*S, out, r) weights (zeros for a slot whose adapter does not run or lacks the projection,
ranks padded with zero rows, each B times its adapter's scaling; separate gate and up halves as
their exact block-diagonal pair over the 2F rows) turns all adapters' low-rank products into two
grouped GEMMs over the E*S groups, on the same rows as the base's. Each row's dropout is its own
adapter's.

The MoE block's dispatch sorts by (expert, slot) from the start when the experts ask
(``row_subgroups``), so the rows arrive grouped; called on rows sorted by expert only, the
forward sorts them itself and puts them back. On CPU in bf16/fp16, where every grouped GEMM would
otherwise place its rows at multiples (``model.grouped``) on its own, the rows are placed once per
(expert, slot) group for the base's and the adapters' GEMMs alike: four adapters of 2 x 256 tokens
in bf16 ran 504 fewer aten ops a step (2916 -> 2412), the same bits, 3-6% faster.

Regrouping the rows by adapter for each delta instead (a gather, a concatenation and a
scatter-add of (R, D)-sized tensors for gate_up and again for down, forward and backward) moved
the rows a dozen times per layer; here they do not move (twice when the forward sorts them itself)
and only the small weights are copied. Four adapters of 2 x 256 tokens (``bench/multi_adapter.py``): the forward saves
220 instead of 256 MiB for backward in fp32 (124 instead of 156 in bf16) and a step runs 8% fewer
ops; CPU step time stayed within the noise.

Legend: R routed rows, E experts, S adapter slots of the batch, r the largest rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...model.dispatch import dispatch, gather_rows, permute_rows, row_experts
from ..core.layer import AdapterLayer
from .experts_layout import PROJ_OF_PAIR, gate_up_pair

# ``layer`` below is a LoraGroupedExperts (importing it here would make a cycle): its adapters,
# pairs, stores and base experts


def stacked_slots(layer: AdapterLayer, names: list[str]) -> list[str | None] | None:
    """The adapter of each slot of this batch (None: no adapter, or one that does not run here)
    when its samples choose among adapters, else None (every running adapter on every row)."""
    runs = layer.selection().runs
    if runs is None or not names or len(runs.runs) == 1:
        return None
    slots = [n if n in names else None for n in runs.names]
    return slots + [None] if runs.tokens_per_slot()[-1] else slots


def stacked_experts(layer: AdapterLayer, x, offsets: torch.Tensor, token_index, slots, groups=None) -> torch.Tensor:
    """The experts' output (R, D) for expert-sorted rows x (R, D), every slot's adapter on its rows.
    ``groups``: the (E*S,) ends of the (expert, slot) groups when the dispatch already sorted each
    expert's rows by slot (``row_subgroups``); else the rows are sorted here and put back after."""
    slot_of_token = layer.selection().slot_of_token
    if groups is None:
        order, groups, slot_of_row = _slot_order(slot_of_token, token_index, offsets, len(slots))
        out = _stacked_forward(layer, slots, gather_rows(x, order), offsets, groups, slot_of_row)
        return permute_rows(out, order)
    if groups.shape[0] != offsets.shape[0] * len(slots):
        raise ValueError(f"{groups.shape[0]} (expert, slot) groups for {offsets.shape[0]} experts x {len(slots)} slots")
    return _stacked_forward(layer, slots, x, offsets, groups, slot_of_token.index_select(0, token_index))


def _stacked_forward(layer, slots, x, offsets, groups, slot_of_row) -> torch.Tensor:
    """Base stages and stacked products on rows grouped by (expert, slot). Where the base places
    rows (CPU bf16/fp16), each group's rows are placed at a multiple once for all six GEMMs: an
    expert's placed range is its groups' (it ends where its last slot's group does)."""
    base, S = layer.base_layer, len(slots)
    layout = base.layout(x, groups)
    if layout is not None:
        x, groups, offsets = layout.place(x), layout.offsets, layout.offsets[S - 1 :: S].contiguous()
    placed = layout is not None
    gate_up = base.project_gate_up(x, offsets, placed)
    gate_up = _add_products(layer, slots, "gate_up", gate_up, x, groups, slot_of_row, layout)
    h = base.gated(gate_up)
    out = _add_products(layer, slots, "down", base.project_down(h, offsets, placed), h, groups, slot_of_row, layout)
    return out if layout is None else layout.take(out)


def _slot_order(slot_of_token: torch.Tensor, token_index: torch.Tensor, offsets: torch.Tensor, slots: int):
    """Rows sorted by (expert, slot), stably: (R,) where each sorted row comes from, the (E*S,)
    int32 cumulative ends of the groups, and (R,) the slot of each sorted row. The dispatch's sort,
    each row taken as a token whose one choice is its expert; on the device, no host sync."""
    slot_of_row = slot_of_token.index_select(0, token_index)
    experts = row_experts(offsets, token_index.shape[0]).unsqueeze(1)
    d = dispatch(experts, offsets.shape[0], (slot_of_row, slots))
    return d.order, d.groups, slot_of_row.index_select(0, d.order)


def _add_products(layer, slots, proj: str, y, x, groups, slot_of_row, layout=None) -> torch.Tensor:
    """``y`` plus each row's adapter's ``s * B_e (A_e drop(x))`` on ``proj`` (gate_up or down), as
    two grouped GEMMs over the (expert, slot) groups (rows placed in ``layout`` when given)."""
    pairs = {n: _projection_pair(layer, n, proj, x.dtype) for n in slots if n is not None}
    pairs = {n: pair for n, pair in pairs.items() if pair is not None}
    if not pairs:
        return y
    a, b = _stacked(pairs, slots, layer.num_experts)
    h = _dropped(layer, [n if n in pairs else None for n in slots], x, slot_of_row, layout)
    linear, placed = layer.base_layer.linear, layout is not None
    return y + linear(linear(h, a, groups, placed), b, groups, placed)


def _projection_pair(layer, name: str, proj: str, dtype: torch.dtype):
    """Adapter ``name``'s product on ``proj`` as one ((E, r, in), (E, out, r)) pair, B scaled, or
    None: a fused pair as it is, gate/up halves as their block-diagonal pair over the 2F rows (a
    half the adapter lacks: rank 0, zero rows), a shared pair expanded to every expert."""
    pairs = layer.pairs(name)
    if not any(p == proj or (proj == "gate_up" and p in ("gate", "up")) for p in pairs):
        return None
    adapter, E = layer.adapters[name], layer.num_experts

    def pair(p: str) -> tuple[torch.Tensor, torch.Tensor]:
        a = adapter.effective_a(layer, p).to(dtype)
        b = layer.lora_b(p)[name].to(dtype) * adapter.scaling(PROJ_OF_PAIR[p])
        return (a.expand(E, -1, -1), b.expand(E, -1, -1)) if a.dim() == 2 else (a, b)

    return gate_up_pair(pairs, pair) if proj == "gate_up" else pair(proj)


def _stacked(pairs: dict, slots: list[str | None], experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E*S, r, in) A and (E*S, out, r) B, expert-major: group e*S + s is slot s's pair of expert e;
    zeros for a slot without a pair, ranks padded with zeros (exact)."""
    a0, b0 = next(iter(pairs.values()))
    rank, d_in, d_out = max(a.shape[-2] for a, _ in pairs.values()), a0.shape[-1], b0.shape[-2]
    a_parts, b_parts = [], []
    for n in slots:
        if n not in pairs:
            a_parts.append(a0.new_zeros(experts, rank, d_in))
            b_parts.append(b0.new_zeros(experts, d_out, rank))
            continue
        a, b = pairs[n]
        a_parts.append(F.pad(a, (0, 0, 0, rank - a.shape[-2])))
        b_parts.append(F.pad(b, (0, rank - b.shape[-1])))
    S = len(slots)
    return torch.stack(a_parts, 1).view(experts * S, rank, d_in), torch.stack(b_parts, 1).view(experts * S, d_out, rank)


def _dropped(layer, holders: list[str | None], x: torch.Tensor, slot_of_row: torch.Tensor, layout=None):
    """x with each row's adapter's dropout (rows of slots without a pair: theirs are multiplied by
    zero weights, so any). One ``F.dropout`` when the adapters share a probability, else a mask
    drawn with each row's own probability. Placed rows (``layout``) are taken out for it and put
    back: the same random numbers as unplaced, none spent on padding."""
    probs = [layer.adapters[n].config.dropout if n is not None else 0.0 for n in holders]
    used = {p for n, p in zip(holders, probs) if n is not None}
    if not layer.training or used == {0.0}:
        return x
    if layout is not None:
        return layout.place(_dropped(layer, holders, layout.take(x), slot_of_row))
    if len(used) == 1:
        return F.dropout(x, used.pop())
    keep = x.new_ones(len(holders))
    for i, p in enumerate(probs):
        if p:
            keep[i] = 1.0 - p  # a fill on the device, no host copy
    keep = keep.index_select(0, slot_of_row).unsqueeze(1)
    return torch.where(torch.rand_like(x) < keep, x / keep, 0.0)
