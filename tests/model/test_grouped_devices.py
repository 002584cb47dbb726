"""Which grouped path each device and dtype gets, and bf16 grouped-vs-loop parity on a GPU.

The CUDA grouped GEMM takes bf16 only (its meta kernel rejects fp32/fp16, so ``torch.compile``
would too): other dtypes on CUDA take the per-expert loop, said once at INFO. The GPU tests skip
on a machine without CUDA; ``bench/gpu_check.sh`` runs them on the GPU day.
"""

from __future__ import annotations

import logging

import pytest
import torch

import moetune
from moetune.config import LoraConfig
from moetune.model import build_random_model
from moetune.model.grouped import cpu_row_multiple, grouped_linear, grouped_linear_loop, grouped_support
from moetune.model.dispatch import dispatch
from moetune.model.moe import GroupedExperts
from moetune.peft.lora.experts import LoraGroupedExperts
from moetune.tiny_models import tiny_model_args

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_grouped_support_by_device_and_dtype():
    assert grouped_support("cuda", torch.bfloat16, (9, 0)) is None
    assert "bfloat16 only" in grouped_support("cuda", torch.float32, (9, 0))
    assert "bfloat16 only" in grouped_support("cuda", torch.float16, (9, 0))
    assert "sm >= 80" in grouped_support("cuda", torch.bfloat16, (7, 5))
    assert all(grouped_support("cpu", dt) is None for dt in (torch.float32, torch.float16, torch.bfloat16))
    assert grouped_support("cpu", torch.float64) is not None
    assert grouped_support("mps", torch.bfloat16) is not None


def test_unsupported_dtype_takes_the_loop_and_says_so_once(caplog):
    offsets = torch.tensor([2, 2, 5], dtype=torch.int32)
    x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 6, 4, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="moetune.model.grouped"):
        ys = [grouped_linear(x, w, offsets) for _ in range(2)]
    lines = [r for r in caplog.records if "per-expert loop" in r.getMessage()]
    assert len(lines) <= 1  # zero when an earlier test in this process already said it
    assert all(torch.equal(y, grouped_linear_loop(x, w, offsets)) for y in ys)


def _experts_pair(device: str, rank: int):
    """Two identical bf16 LoRA experts layers on ``device``: grouped, and the reference loop."""
    layers = []
    for use_loop in (False, True):
        torch.manual_seed(0)
        base = GroupedExperts(num_experts=8, dim=64, hidden=32, use_loop=use_loop)
        with torch.no_grad():
            base.gate_up_proj.normal_(0, 0.1), base.down_proj.normal_(0, 0.1)
        base.requires_grad_(False)
        layer = LoraGroupedExperts(base.to(device, torch.bfloat16))
        layer.add_adapter("default", LoraConfig(r=rank, alpha=2 * rank, target_modules=["experts"]))
        with torch.no_grad():
            for _, p in layer.adapter_params("default"):
                p.normal_(0, 0.1)
        layers.append(layer)
    return layers


def _bf16_parity(device: str, rank: int) -> None:
    fast, ref = _experts_pair(device, rank)
    choices = torch.randint(0, 7, (256, 2), device=device)  # expert 7 gets no rows
    d = dispatch(choices, 8)
    x = torch.randn(256, 64, device=device, dtype=torch.bfloat16)
    results = []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_(True)
        y = layer(xi[d.token_index], d.offsets, token_index=d.token_index)
        y.float().pow(2).sum().backward()
        results.append([y.float(), xi.grad.float()] + [p.grad.float() for _, p in layer.adapter_params("default")])
    for a, b in zip(*results):
        scale = b.abs().max().clamp_min(1e-3)
        assert (a - b).abs().max() / scale < 2e-2, (a - b).abs().max()


@gpu
@pytest.mark.parametrize("rank", [4, 16])  # 4 in bf16 is 8 bytes: the padded grouped GEMM
def test_bf16_grouped_matches_loop_on_gpu(rank):
    _bf16_parity("cuda", rank)


def test_bf16_grouped_matches_loop_on_cpu():
    _bf16_parity("cpu", 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_rows_come_in_multiples_and_equal_the_loop(dtype, monkeypatch):
    """On CPU in bf16/fp16 each expert's rows reach grouped_mm as a multiple of cpu_row_multiple()
    (so oneDNN meets the same few shapes step after step), with the same results as the loop, bit
    for bit, gradients included; fp32 rows go as they are."""
    calls = []
    real = torch.nn.functional.grouped_mm

    def spy(a, b, *, offs, **kwargs):
        calls.append((a.dtype, torch.diff(offs, prepend=offs.new_zeros(1))))
        return real(a, b, offs=offs, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", spy)
    d = dispatch(torch.randint(0, 6, (300, 2), generator=torch.Generator().manual_seed(0)), 7)  # expert 6: none
    for dt in (dtype, torch.float32):
        x = torch.randn(600, 40, dtype=dt, requires_grad=True)
        w = torch.randn(7, 24, 40, dtype=dt, requires_grad=True)
        y, y_ref = grouped_linear(x, w, d.offsets), grouped_linear_loop(x, w, d.offsets)
        dy = torch.randn_like(y)
        assert torch.equal(y, y_ref)
        assert all(map(torch.equal, torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y_ref, (x, w), dy)))
    half = [counts for dt, counts in calls if dt == dtype]  # forward, and backward's two products
    full = [counts for dt, counts in calls if dt == torch.float32]  # forward (autograd's backward is C++)
    multiple = cpu_row_multiple(600, 7)
    assert multiple == 8 and cpu_row_multiple(32768, 128) == 32 and cpu_row_multiple(10**6, 8) == 64
    assert len(half) == 3 and all(bool((c % multiple == 0).all()) and c.sum() > 600 for c in half)
    assert full and all(torch.equal(c, d.counts.int()) for c in full)


def test_cpu_row_padding_keeps_only_unpadded_rows_for_backward():
    offsets = torch.tensor([5, 5, 40, 41], dtype=torch.int32)
    x = torch.randn(41, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        grouped_linear(x, w, offsets)
    assert (41, 32) in saved and all(len(s) != 2 or s[0] <= 41 for s in saved), saved  # padded: 41 + 3 * 7 rows


@gpu
def test_fp32_on_gpu_takes_a_supported_path():
    offsets = torch.tensor([3, 3, 8], dtype=torch.int32, device="cuda")
    x, w = torch.randn(8, 16, device="cuda"), torch.randn(3, 32, 16, device="cuda")
    assert torch.equal(grouped_linear(x, w, offsets), grouped_linear_loop(x, w, offsets))


@gpu
def test_bf16_training_step_never_syncs_on_gpu():
    model = build_random_model(tiny_model_args("qwen3_moe"), dtype=torch.bfloat16, device="cuda")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
    moetune.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    ids = torch.randint(0, 200, (2, 64), device="cuda")
    model(ids, labels=ids).loss.backward()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _nf4_lora_experts() -> LoraGroupedExperts:
    """A QLoRA experts layer in bf16: the base's GEMMs go through its stored (NF4) weights."""
    from moetune.model.quant import QuantGroupedExperts
    from moetune.peft.lora.qlora import QLoraGroupedExperts

    torch.manual_seed(0)
    base = GroupedExperts(num_experts=8, dim=64, hidden=32)
    with torch.no_grad():
        base.gate_up_proj.normal_(0, 0.1), base.down_proj.normal_(0, 0.1)
    layer = QLoraGroupedExperts(QuantGroupedExperts.from_experts(base).to(torch.bfloat16))
    layer.add_adapter("default", LoraConfig(r=16, alpha=32, target_modules=["experts"]))
    with torch.no_grad():
        for _, p in layer.adapter_params("default"):
            p.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("base", ["bf16", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cpu_half_precision_lora_experts_place_rows_once(base, dropout, monkeypatch):
    """On CPU in bf16 a LoRA experts layer places its routed rows once for the base's and the
    adapter's six GEMMs (none pads again) and computes what padding per GEMM computes, outputs and
    gradients bit for bit, dropout masks included (drawn over the rows, not the placed rows), on a
    bf16 base and on an NF4 one."""
    from moetune.model import grouped

    layer = _experts_pair("cpu", 16)[0] if base == "bf16" else _nf4_lora_experts()
    layer.adapters["default"].config.dropout = dropout
    padded_per_call = []
    real = grouped._RowPaddedGroupedLinear.apply
    monkeypatch.setattr(grouped._RowPaddedGroupedLinear, "apply", lambda *a: padded_per_call.append(1) or real(*a))
    d = dispatch(torch.randint(0, 7, (256, 2), generator=torch.Generator().manual_seed(1)), 8)
    x = torch.randn(256, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    results = []
    for places_rows in (True, False):
        layer.base_layer.places_rows = places_rows
        padded_per_call.clear()
        torch.manual_seed(3)  # the same dropout mask for both
        xi = x.clone().requires_grad_(True)
        y = layer(xi[d.token_index], d.offsets, token_index=d.token_index)
        y.float().pow(2).sum().backward()
        results.append([y, xi.grad] + [p.grad for _, p in layer.adapter_params("default")])
        layer.zero_grad(set_to_none=True)
        per_call = {"bf16": 6, "nf4": 8}[base]  # NF4: the base's input gradients run grouped_linear again
        assert len(padded_per_call) == (0 if places_rows else per_call)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_cpu_half_precision_experts_place_rows_once_with_the_same_results():
    torch.manual_seed(0)
    base = GroupedExperts(num_experts=8, dim=64, hidden=32).to(torch.bfloat16)
    with torch.no_grad():
        base.gate_up_proj.normal_(0, 0.1), base.down_proj.normal_(0, 0.1)
    d = dispatch(torch.randint(0, 7, (256, 2), generator=torch.Generator().manual_seed(1)), 8)
    x = torch.randn(256, 64, dtype=torch.bfloat16)
    results = []
    for places_rows in (True, False):
        base.places_rows = places_rows
        assert (base.layout(x[d.token_index], d.offsets) is not None) == places_rows
        xi = x.clone().requires_grad_(True)
        y = base(xi[d.token_index], d.offsets, token_index=d.token_index)
        y.float().pow(2).sum().backward()
        results.append([y, xi.grad, base.gate_up_proj.grad, base.down_proj.grad])
        base.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _together_vs_alone(device: str) -> None:
    """Two adapters (ranks 4 and 16: the padded and the aligned grouped GEMM) chosen per sample in
    one bf16 forward give each sample the loss it gets with its adapter alone, and the same
    adapter gradients as the two adapters trained alone on their own samples."""
    torch.manual_seed(0)
    model = build_random_model(tiny_model_args("qwen3_moe"), dtype=torch.bfloat16, device=device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
    for name, rank in (("a", 4), ("b", 16)):
        moetune.add_adapter(model, LoraConfig(r=rank, alpha=8, target_modules=targets), name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 200, (4, 32), device=device)
    names = ["a", "b", "b", "a"]
    out = model(ids, labels=ids, adapter_names=names)
    out.token_loss.sum().backward()
    together = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        moetune.set_adapter(model, name)
        alone = model(ids[rows], labels=ids[rows])
        alone.token_loss.sum().backward()
        torch.testing.assert_close(out.token_loss[rows].float(), alone.token_loss.float(), rtol=2e-2, atol=2e-2)
    for n, p in model.named_parameters():
        if p.grad is not None:
            scale = p.grad.float().abs().max().clamp_min(1e-3)
            assert (together[n] - p.grad.float()).abs().max() / scale < 5e-2, n


def test_bf16_adapters_chosen_per_sample_equal_each_alone_on_cpu():
    _together_vs_alone("cpu")


@gpu
def test_bf16_adapters_chosen_per_sample_equal_each_alone_on_gpu():
    _together_vs_alone("cuda")
