"""Several adapters chosen per sample on routed experts, run as stacked grouped GEMMs: outputs and
gradients equal each adapter run alone on its own samples' rows (float64, to rounding); which
batches take the stacked path and which take the regrouping path."""

from __future__ import annotations

import pytest
import torch

from moetune.config import LoraConfig
from moetune.model.moe import GroupedExperts, dispatch
from moetune.peft.core.context import AdapterContext, adapter_context
from moetune.peft.core.layer import AddOptions
from moetune.peft.lora import experts as experts_module
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


def _routed():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(BATCH * SEQ, D, generator=g, dtype=torch.float64)
    choice = torch.stack([torch.randperm(E - 1, generator=g)[:2] for _ in range(BATCH * SEQ)])  # expert E-1: none
    d = dispatch(choice, E)
    return tokens[d.token_index].clone().requires_grad_(), d.offsets, d.token_index


ALL = {"gate_proj", "up_proj", "down_proj"}
STACKABLE = {  # fused gate_up and down pairs, ranks 4 and 6, a down-only adapter, a shared-rank one
    "a": (ALL, {}),
    "b": ({"down_proj"}, {"r": 6, "alpha": 3.0}),
    "c": (ALL, {"expert_rank": "shared", "use_rslora": True}),
}


@pytest.mark.parametrize("names", [["a", "b", "c", None], ["b", "a", "b", "a"], ["c", None, None, "a"]])
def test_stacked_adapters_equal_each_adapter_alone(names, monkeypatch):
    layer = _layer(STACKABLE)
    taken = []
    stacked = experts_module.stacked_experts
    monkeypatch.setattr(experts_module, "stacked_experts", lambda *a: taken.append(1) or stacked(*a))
    x, offsets, token_index = _routed()
    sample = token_index // SEQ
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = dict(layer.adapter_params())

    def grads(y):
        return torch.autograd.grad((y * weights).sum(), [x, *params.values()], allow_unused=True)

    layer.active = []
    with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=names)):
        together = layer(x, offsets, token_index=token_index)
    assert taken == [1]
    alone = layer(x, offsets, token_index=token_index)  # the base, for samples without an adapter
    for n in {n for n in names if n is not None}:
        layer.active = [n]
        mine = torch.tensor([names[s] == n for s in sample.tolist()]).unsqueeze(1)
        alone = torch.where(mine, layer(x, offsets, token_index=token_index), alone)
    assert (together - alone).abs().max() < 1e-12
    for got, want in zip(grads(together), grads(alone)):
        assert (got is None) == (want is None) and (got is None or (got - want).abs().max() < 1e-12)


@pytest.mark.parametrize(
    "adapters",
    [
        {"a": (ALL, {}), "g": ({"gate_proj", "down_proj"}, {})},  # a gate half: no fused pair to stack
        {"a": (ALL, {}), "d": (ALL, {"dropout": 0.1})},  # two dropouts
    ],
)
def test_other_batches_take_the_regrouping_path(adapters, monkeypatch):
    layer = _layer(adapters)
    monkeypatch.setattr(experts_module, "stacked_experts", lambda *a: pytest.fail("stacked path taken"))
    x, offsets, token_index = _routed()
    layer.active = []
    with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=list(adapters) * 2)):
        layer(x, offsets, token_index=token_index)


def test_one_adapter_for_the_whole_batch_runs_as_usual(monkeypatch):
    layer = _layer(STACKABLE)
    monkeypatch.setattr(experts_module, "stacked_experts", lambda *a: pytest.fail("stacked path taken"))
    x, offsets, token_index = _routed()
    layer.active = []
    with adapter_context(AdapterContext(batch_size=BATCH, seq_len=SEQ, adapter_names=["a"] * BATCH)):
        layer(x, offsets, token_index=token_index)
