"""Per-sample adapter rows from the host list of names: ranges, expert rows sorted by adapter, no host copy."""

from __future__ import annotations

import pytest
import torch

from host_syncs import HostSyncCounter
from moetune.model.dispatch import dispatch
from moetune.peft.core.selection import SampleRuns
from moetune.peft.lora.stacked_experts import _slot_order


def test_runs_ranges_and_slots():
    sel = SampleRuns.of(["b", "b", None, "a", "b"], seq_len=3)
    assert sel.names == ("b", "a") and sel.runs == ((0, 2, 0), (2, 3, 2), (3, 4, 1), (4, 5, 0))
    assert sel.segments() == [(6, 0), (3, 2), (3, 1), (3, 0)] and sel.tokens_per_slot() == [9, 3, 3]
    assert sel.segments(range(4, 13)) == [(2, 0), (3, 2), (3, 1), (1, 0)]  # a call on token rows 4..12 (a loss chunk)
    assert sel.slot_of_token(torch.device("cpu")).tolist() == [0] * 6 + [2] * 3 + [1] * 3 + [0] * 3
    assert sel.sample_mask("b", torch.device("cpu")).tolist() == [True, True, False, False, True]


def test_routed_rows_sorted_by_expert_then_adapter_without_host_syncs():
    """The stacked expert path's row order: each expert's rows sorted by adapter slot (a
    permutation inside the expert's range, so the base's offsets still hold), with the group ends."""
    B, T, k, E = 4, 3, 2, 5
    sel = SampleRuns.of(["a", None, "b", "a"], seq_len=T)
    g = torch.Generator().manual_seed(0)
    choice = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B * T)])
    d = dispatch(choice, E)
    slot_of_token = sel.slot_of_token(torch.device("cpu"))
    with HostSyncCounter() as counter:
        order, ends, slot_of_row = _slot_order(slot_of_token, d.token_index, d.offsets, 3)
    assert not counter.counts, counter.report()
    expert = torch.searchsorted(d.offsets, torch.arange(B * T * k, dtype=torch.int32), right=True)
    assert torch.equal(expert[order], expert)  # every row stays in its expert's range
    slot = slot_of_token[d.token_index[order]]
    assert torch.equal(slot, slot_of_row)
    counts = torch.bincount(expert * 3 + slot_of_token[d.token_index], minlength=E * 3)
    assert torch.equal(ends, counts.cumsum(0).to(torch.int32))
    for e in range(E):  # inside an expert: by slot, then in token order
        rows = slice(int(d.offsets[e - 1]) if e else 0, int(d.offsets[e]))
        key = slot[rows] * 1000 + d.token_index[order][rows]
        assert torch.equal(key, key.sort().values)


@pytest.mark.parametrize("shape", [(3, 4, 2, 8), (3, 2, 4, 8)], ids=["B,T,H,in", "B,H,T,in"])
def test_linear_inputs_samples_first_take_their_samples_adapter(shape):
    """A linear called on (B, ...) (heads after or before the tokens, as attention variants do):
    each sample's rows run its own adapter only."""
    from torch import nn

    from moetune.config import LoraConfig
    from moetune.peft.core.context import AdapterContext, adapter_context
    from moetune.peft.lora.linear import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6))
    for name in ("a", "b"):
        layer.add_adapter(name, LoraConfig(r=2, target_modules=["x"]))
        torch.nn.init.normal_(layer.lora_B[name])
    x = torch.randn(shape)
    names = ["b", None, "a"]
    with adapter_context(AdapterContext(batch_size=3, seq_len=4, adapter_names=names)):
        mixed = layer(x)
    for i, n in enumerate(names):
        layer.active = [] if n is None else [n]
        assert torch.allclose(mixed[i], layer(x[i]), atol=1e-6), (i, n)
