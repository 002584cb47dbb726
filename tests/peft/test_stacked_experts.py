"""Several adapters chosen per sample on routed experts, run as stacked grouped GEMMs: outputs and
gradients equal each adapter run alone on its own samples' rows (float64, to rounding), for every
kind of pair; each row gets its own adapter's dropout."""

from __future__ import annotations

import pytest
import torch

from moetune.config import LoraConfig
from moetune.model.dispatch import dispatch
from moetune.model.moe import GroupedExperts
from moetune.peft.core.context import AdapterContext, adapter_context
from moetune.peft.core.layer import AddOptions
from moetune.peft.lora import experts as experts_module
from moetune.peft.lora import stacked_experts as stacked_module
from moetune.peft.lora.experts import LoraGroupedExperts

E, D, FH = 5, 16, 12
BATCH, SEQ = 4, 6


def _layer(adapters: dict[str, tuple[set[str], dict]]) -> LoraGroupedExperts:
    g = torch.Generator().manual_seed(0)
    base = GroupedExperts(num_experts=E, dim=D, hidden=FH)
    with torch.no_grad():
        base.gate_up_proj.copy_(torch.randn(base.gate_up_proj.shape, generator=g) * 0.2)
        base.down_proj.copy_(torch.randn(base.down_proj.shape, generator=g) * 0.2)
    base.requires_grad_(False)
    layer = LoraGroupedExperts(base)
    for name, (parts, options) in adapters.items():
        config = LoraConfig(target_modules=["experts"], **{"r": 4, "alpha": 8.0, **options})
        layer.add_adapter(name, config, AddOptions(parts=frozenset(parts)))
    with torch.no_grad():
        for _, p in layer.adapter_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return layer.double()


def _routed(subgroups=None):
    """Routed rows (R, D), offsets, token index and the (expert, slot) group ends (None unless
    ``subgroups``, the layer's :meth:`row_subgroups`, asked the dispatch to sort by slot)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(BATCH * SEQ, D, generator=g, dtype=torch.float64)
    choice = torch.stack([torch.randperm(E - 1, generator=g)[:2] for _ in range(BATCH * SEQ)])  # expert E-1: none
    d = dispatch(choice, E, subgroups)
    return tokens[d.token_index].clone().requires_grad_(), d.offsets, d.token_index, d.groups


def _each_alone(layer, x, offsets, token_index, names):
    """Every row from its own sample's adapter run alone (the base for samples without one)."""
    sample = token_index // SEQ
    layer.active = []
    alone = layer(x, offsets, token_index=token_index)
    for n in {n for n in names if n is not None}:
        layer.active = [n]
        mine = torch.tensor([names[s] == n for s in sample.tolist()]).unsqueeze(1)
        alone = torch.where(mine, layer(x, offsets, token_index=token_index), alone)
    return alone


ALL = {"gate_proj", "up_proj", "down_proj"}
STACKED = {  # fused pairs, ranks 4 and 6, a down-only adapter, a shared-rank one
    "a": (ALL, {}),
    "b": ({"down_proj"}, {"r": 6, "alpha": 3.0}),
    "c": (ALL, {"expert_rank": "shared", "use_rslora": True}),
}
HALVES = {  # a gate half with down, an up half alone (shared), beside a fused pair; dropouts differ
    "a": (ALL, {"dropout": 0.1}),
    "g": ({"gate_proj", "down_proj"}, {"r": 3}),
    "u": ({"up_proj"}, {"expert_rank": "shared", "dropout": 0.3}),
}


@pytest.mark.parametrize("sorted_by_slot", [True, False], ids=["dispatched-by-slot", "sorted-here"])
@pytest.mark.parametrize(
    "adapters, names",
    [
        (STACKED, ["a", "b", "c", None]),
        (STACKED, ["b", "a", "b", "a"]),
        (STACKED, ["c", None, None, "a"]),
        (HALVES, ["g", "a", "u", None]),
        (HALVES, ["u", "g", "u", "g"]),
    ],
)
def test_stacked_adapters_equal_each_adapter_alone(adapters, names, sorted_by_slot, monkeypatch):
    """Evaluation mode (no dropout): the together output and every gradient equal each adapter
    run alone, each row then taking its own sample's result - whether the dispatch sorted each
    expert's rows by slot (as the MoE block does) or the rows arrive sorted by expert only."""
    layer = _layer(adapters).eval()
    taken = []
    stacked = experts_module.stacked_experts
    monkeypatch.setattr(experts_module, "stacked_experts", lambda *a: taken.append(a[-1]) or stacked(*a))
    params = dict(layer.adapter_params())
    layer.active = []
    with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=names)):
        x, offsets, token_index, groups = _routed(layer.row_subgroups() if sorted_by_slot else None)
        together = layer(x, offsets, token_index=token_index, groups=groups)
    assert len(taken) == 1 and (taken[0] is not None) == sorted_by_slot
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def grads(y):
        return torch.autograd.grad((y * weights).sum(), [x, *params.values()], allow_unused=True)

    alone = _each_alone(layer, x, offsets, token_index, names)
    assert (together - alone).abs().max() < 1e-12
    for got, want in zip(grads(together), grads(alone)):
        assert (got is None) == (want is None) and (got is None or (got - want).abs().max() < 1e-12)


def test_each_row_gets_its_own_adapters_dropout():
    """Adapters with different dropouts in one batch: each row's mask is drawn with its adapter's
    probability and kept values are scaled by 1 / (1 - p); one shared probability is F.dropout."""
    layer = _layer(HALVES)
    x = torch.ones(30000, 8, dtype=torch.float64)
    slot_of_row = torch.arange(30000) % 4  # slots a, g, u, and samples without an adapter
    dropped = stacked_module._dropped(layer, ["a", "g", "u", None], x, slot_of_row)
    for slot, p in enumerate([0.1, 0.0, 0.3]):
        rows = dropped[slot_of_row == slot]
        assert set(rows.unique().tolist()) <= {0.0, 1 / (1 - p)}
        assert abs((rows == 0).double().mean().item() - p) < 0.01
    layer.eval()
    assert stacked_module._dropped(layer, ["a", "g", "u", None], x, slot_of_row) is x


def test_one_adapter_for_the_whole_batch_runs_as_usual(monkeypatch):
    layer = _layer(STACKED)
    monkeypatch.setattr(experts_module, "stacked_experts", lambda *a: pytest.fail("stacked path taken"))
    x, offsets, token_index, _ = _routed()
    layer.active = []
    with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=["a"] * BATCH)):
        assert layer.row_subgroups() is None  # the dispatch sorts by expert only
        layer(x, offsets, token_index=token_index)


def test_dispatch_by_subgroup_keeps_each_expert_one_range_split_by_subgroup():
    """Sorting by (expert, subgroup): the same offsets and counts as by expert, each expert's rows
    in subgroup order (stable: tokens in order inside a group), ``groups`` their ends."""
    g = torch.Generator().manual_seed(3)
    choice = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(30)])
    sub = torch.randint(0, 3, (30,), generator=g)
    plain, by_sub = dispatch(choice, E), dispatch(choice, E, (sub, 3))
    assert torch.equal(plain.offsets, by_sub.offsets) and torch.equal(plain.counts, by_sub.counts)
    want = sorted(range(60), key=lambda i: (choice.view(-1)[i].item(), sub[i // 2].item(), i))
    assert by_sub.order.tolist() == want and torch.equal(by_sub.token_index, by_sub.order // 2)
    keys = [(choice.view(-1)[i].item() * 3 + sub[i // 2].item()) for i in want]
    assert by_sub.groups.tolist() == [sum(k <= group for k in keys) for group in range(E * 3)]
    assert plain.groups is None


def test_groups_for_another_number_of_slots_are_refused():
    layer = _layer(STACKED)
    layer.active = []
    with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=["a", "b", "c", None])):
        x, offsets, token_index, groups = _routed((layer.selection().slot_of_token, 2))
        with pytest.raises(ValueError, match="groups for 5 experts x 4 slots"):
            layer(x, offsets, token_index=token_index, groups=groups)


def test_nf4_base_with_stacked_adapters_equals_each_alone():
    """QLoRA: the stacked products run on an NF4 base's rows the same way (fp32, to rounding)."""
    from moetune.model.quant.modules import QuantGroupedExperts
    from moetune.peft.lora.qlora import QLoraGroupedExperts

    g = torch.Generator().manual_seed(0)
    base = GroupedExperts(num_experts=E, dim=64, hidden=32)
    with torch.no_grad():
        base.gate_up_proj.copy_(torch.randn(base.gate_up_proj.shape, generator=g) * 0.2)
        base.down_proj.copy_(torch.randn(base.down_proj.shape, generator=g) * 0.2)
    layer = QLoraGroupedExperts(QuantGroupedExperts.from_experts(base))
    for name, parts in (("a", ALL), ("g", {"gate_proj", "down_proj"})):
        layer.add_adapter(name, LoraConfig(r=4, alpha=8.0, target_modules=["experts"]), AddOptions(frozenset(parts)))
    with torch.no_grad():
        for _, p in layer.adapter_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tokens = torch.randn(BATCH * SEQ, 64, generator=g)
    d = dispatch(torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(BATCH * SEQ)]), E)
    x, names = tokens[d.token_index], ["a", "g", None, "a"]
    layer.active = []
    with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=names)):
        together = layer(x, d.offsets, token_index=d.token_index)
    alone = _each_alone(layer, x, d.offsets, d.token_index, names)
    assert (together - alone).abs().max() <= 1e-6 * max(1.0, alone.abs().max().item())


@pytest.mark.parametrize("adapters, names", [(STACKED, ["a", "b", "c", None]), (HALVES, ["g", "a", "u", None])])
def test_bf16_rows_placed_once_per_group_equal_unplaced(adapters, names, monkeypatch):
    """CPU bf16: each (expert, slot) group's rows are placed at a multiple once for all six GEMMs
    (base and stacked products); outputs and gradients equal the unplaced path bit for bit, and
    each adapter's dropout draws the same numbers."""
    layer = _layer(adapters).to(torch.bfloat16)
    layouts = []
    real = layer.base_layer.layout

    def layout(x, offsets):
        layouts.append(real(x, offsets))
        return layouts[-1]

    def run(place: bool):
        monkeypatch.setattr(layer.base_layer, "layout", layout if place else lambda *_: None)
        layer.active = []
        torch.manual_seed(0)
        with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=names)):
            x, offsets, token_index, groups = _routed(layer.row_subgroups())
            x = x.detach().to(torch.bfloat16).requires_grad_()
            y = layer(x, offsets, token_index=token_index, groups=groups)
        y.float().pow(2).sum().backward()
        grads = [x.grad] + [p.grad.clone() for _, p in layer.adapter_params() if p.grad is not None]
        layer.zero_grad()
        return y, grads

    placed, unplaced = run(True), run(False)
    assert layouts and layouts[0] is not None and layouts[0].offsets.shape[0] == E * len(set(names))
    assert torch.equal(placed[0], unplaced[0])
    assert all(torch.equal(a, b) for a, b in zip(placed[1], unplaced[1], strict=True))
