"""No host syncs in a training step: forward + loss + backward, MoE + attention + LoRA (issue 19).

The counter (``tests/host_syncs.py``) watches aten ops and tensor methods that read device memory
on the host. It sees them on the CPU too, so this CPU test guards what a GPU run would stall on.
"""

from __future__ import annotations

import pytest
import torch

import moetune
from host_syncs import HostSyncCounter
from moetune.model import build_random_model
from moetune.model.grouped import grouped_linear, grouped_linear_loop
from moetune.config import MixtureConfig
from moetune.model.dispatch import dispatch, expert_counts
from moetune.tiny_models import tiny_model_args

ATTENTION = {"qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"], "deepseek_v3": ["q_b_proj", "kv_b_proj", "o_proj"]}


def _step(family: str, rank: int, adapters: int, dtype: torch.dtype = torch.float32) -> HostSyncCounter:
    model = build_random_model(tiny_model_args(family), dtype=dtype)
    targets = ATTENTION[family] + ["experts"]
    # rank 2 in fp32 (like 4 in bf16) is 8 bytes: the LoRA grouped GEMMs must pad, not fall back to the loop
    moetune.add_adapter(model, moetune.LoraConfig(r=rank, alpha=8, dropout=0.1, target_modules=targets))
    names = None
    if adapters == 2:  # per-sample adapters: row masks in the experts, per-row head contexts in the loss
        moetune.add_adapter(model, moetune.LoraConfig(r=8, alpha=8, target_modules=targets), name="b")
        names = ["default", "b"]
    ids = torch.randint(0, 200, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt: positions that do not count
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    with HostSyncCounter() as counter:
        out = model(ids, attention_mask=mask, labels=labels, adapter_names=names)
        (out.loss + out.aux_loss).backward()
    return counter


# Two adapters per batch: each adapter's rows are known on the host from the adapter names (ranges
# of samples), so the layers slice them, and the experts regroup their routed rows by adapter with
# a sort on the device and static block sizes: nothing is read back or copied from the host.
# bf16 on CPU: the routed rows are placed at multiples for the expert GEMMs (per (expert, adapter)
# group when two adapters share the batch), with positions computed on the device too.
@pytest.mark.parametrize(
    "family,rank,adapters,dtype",
    [("qwen3_moe", 2, 1, torch.float32), ("deepseek_v3", 4, 2, torch.float32), ("qwen3_moe", 4, 2, torch.bfloat16)],
)
def test_training_step_has_no_host_sync(family, rank, adapters, dtype):
    counter = _step(family, rank, adapters, dtype)
    assert not counter.counts, counter.report()


def test_router_stats_without_padding_make_no_host_copy():
    model = build_random_model(tiny_model_args("qwen3_moe"))
    ids = torch.randint(0, 200, (2, 12))
    with HostSyncCounter() as counter:
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
    assert not counter.counts, counter.report()


# MixLoRA's top_p reads how many of the E slots per token are used (one sync per mixture layer):
# the frozen FFN would otherwise run on every slot. Switch's unused slots (dropped tokens) and a
# MoLA linear's join the last expert's group with combine weight 0 instead.
@pytest.mark.parametrize(
    "kind,routing,syncs",
    [
        ("mixlora", "top_k", {}),
        ("mixlora", "switch", {}),
        ("mola", "top_p", {}),
        ("mixlora", "top_p", {"_local_scalar_dense": 2}),
    ],
)
def test_mixture_step_host_syncs(kind, routing, syncs):
    """Mixtures on a dense model's FFN (2 layers) or linears: a training step's host syncs."""
    model = build_random_model(tiny_model_args("qwen3"))
    mixture = MixtureConfig(kind=kind, num_experts=4, routing=routing, top_p=0.6)
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=targets, mixture=mixture))
    ids = torch.randint(0, 200, (2, 12))
    with HostSyncCounter() as counter:
        model(ids, labels=ids).loss.backward()
    assert dict(counter.counts) == syncs, counter.report()


def test_two_mixtures_per_batch_step_has_no_host_sync():
    """Each sample names its MixLoRA adapter: its routed rows come from the runs of samples known
    on the host (with padding they are the real tokens among them, found with nonzero)."""
    model = build_random_model(tiny_model_args("qwen3"))
    for name in ("a", "b"):
        mixture = MixtureConfig(kind="mixlora", num_experts=4, routing="top_k")
        moetune.add_adapter(
            model, moetune.LoraConfig(r=4, alpha=8, target_modules=["gate_proj"], mixture=mixture), name
        )
    ids = torch.randint(0, 200, (3, 8))
    with HostSyncCounter() as counter:
        model(ids, labels=ids, adapter_names=["a", "b", "a"]).loss.backward()
    assert not counter.counts, counter.report()


def test_counter_sees_what_it_should():
    offsets = torch.tensor([2, 2, 5], dtype=torch.int32)
    x, w = torch.randn(5, 4), torch.randn(3, 4, 4)
    with HostSyncCounter() as counter:
        grouped_linear_loop(x, w, offsets)  # offsets.tolist()
        torch.bincount(offsets)
        x[x[:, 0] > 0]
        x.sum().item()
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]))
    assert set(counter.counts) == {
        "Tensor.tolist",
        "bincount",
        "index(boolean mask)",
        "_local_scalar_dense",
        "repeat_interleave(tensor repeats)",
        "tensor(host data)",  # torch.tensor([1, 2, 0]): on a GPU, a blocking copy from the host
    }


def test_dispatch_offsets_match_bincount_including_empty_experts():
    choices = torch.tensor([[3, 0], [0, 3], [5, 3], [0, 5]])  # experts 1, 2, 4 and 6 get no rows
    d = dispatch(choices, 7)
    counts = torch.bincount(choices.reshape(-1), minlength=7)
    assert torch.equal(d.counts, counts)
    assert d.offsets.dtype == torch.int32 and torch.equal(d.offsets, counts.cumsum(0).to(torch.int32))
    assert torch.equal(d.order, torch.argsort(choices.reshape(-1), stable=True))
    dropped = torch.tensor([[3, 7], [0, 7], [5, 3]])  # id 7 = E: a slot no expert takes
    assert torch.equal(expert_counts(dropped, 7), torch.bincount(dropped.reshape(-1), minlength=8)[:7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_in", [(4, 32), (32, 4), (12, 20)])
def test_padded_grouped_gemm_equals_the_loop(dtype, out_in):
    """Dimensions off the 16-byte rule (a rank 4 in bf16) are zero-padded, not looped: same numbers."""
    offsets = torch.tensor([3, 3, 11, 11, 20], dtype=torch.int32)
    x = torch.randn(20, out_in[1], dtype=dtype, requires_grad=True)
    w = torch.randn(5, *out_in, dtype=dtype, requires_grad=True)
    with HostSyncCounter() as counter:
        y = grouped_linear(x, w, offsets)
        grads = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert not counter.counts, counter.report()
    y_ref = grouped_linear_loop(x, w, offsets)
    ref = torch.autograd.grad(y_ref, (x, w), torch.ones_like(y_ref))
    tol = 0 if dtype == torch.bfloat16 else 1e-6  # fp32 K=20 -> 24 may reorder a sum by one ulp
    assert (y - y_ref).abs().max() <= tol
    assert all((a - b).abs().max() <= tol for a, b in zip(grads, ref))
