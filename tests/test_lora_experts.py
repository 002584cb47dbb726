"""LoRA on grouped experts: split-LoRA vs a per-expert reference, invariants, PEFT parity and layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moetune.config import LoraConfig
from moetune.errors import AdapterError
from moetune.model.context import ForwardContext, forward_context
from moetune.model.moe import GroupedExperts, dispatch
from moetune.peft.experts import LoraGroupedExperts

E, D, FH, R = 4, 32, 24, 4
ALL = {"gate_proj", "up_proj", "down_proj"}


def _experts(seed: int = 0) -> GroupedExperts:
    g = torch.Generator().manual_seed(seed)
    base = GroupedExperts(num_experts=E, dim=D, hidden=FH)
    with torch.no_grad():
        base.gate_up_proj.copy_(torch.randn(base.gate_up_proj.shape, generator=g) * 0.2)
        base.down_proj.copy_(torch.randn(base.down_proj.shape, generator=g) * 0.2)
    base.requires_grad_(False)
    return base


def _routed(batch: int = 3, seq: int = 5, k: int = 2, seed: int = 1):
    """Sorted rows for B*T tokens routed to k experts each; expert E-1 gets no rows."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch * seq, D, generator=g)
    choice = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(batch * seq)])
    d = dispatch(choice, E)
    return tokens[d.token_index].clone(), d.offsets, d.token_index


def _layer(parts=ALL, rank_mode="per_expert", dropout=0.0, name="default", layer=None, seed=2) -> LoraGroupedExperts:
    layer = layer or LoraGroupedExperts(_experts())
    layer.add_adapter(name, LoraConfig(r=R, alpha=8.0, dropout=dropout, target_modules=["experts"],
                                       expert_rank=rank_mode), parts=set(parts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in layer.adapter_params(name):  # O(1) outputs and gradients
            p.copy_(torch.randn(p.shape, generator=g) * (0.15 if key.startswith("lora_A") else 0.1))
    return layer


def _reference(layer: LoraGroupedExperts, name: str, params: dict, x, offsets):
    """Per-expert loop with explicit ``s * B_e @ A_e`` (the formula we never use in training)."""
    base, s, p = layer.base_layer, layer.configs[name].scaling, layer.configs[name].dropout
    ends = offsets.tolist()
    spans = list(zip([0] + ends[:-1], ends))

    def delta(pair, e):
        a, b = params[f"lora_A_{pair}"], params[f"lora_B_{pair}"]
        return s * ((b @ a) if a.dim() == 2 else b[e] @ a[e])

    def proj(inp, dinp, weight, pairs_rows):
        outs = []
        for e, (lo, hi) in enumerate(spans):
            y = F.linear(inp[lo:hi], weight[e])
            for pair, rows in pairs_rows:
                d = torch.zeros_like(weight[e])
                d[rows] = delta(pair, e)
                y = y + F.linear(dinp[lo:hi], d)
            outs.append(y)
        return torch.cat(outs)

    pairs = layer.pairs(name)
    rows = {"gate_up": slice(None), "gate": slice(0, FH), "up": slice(FH, 2 * FH), "down": slice(None)}
    gu_pairs = [(q, rows[q]) for q in pairs if q != "down"]
    dx = F.dropout(x, p, True) if p and gu_pairs else x
    gate, up = proj(x, dx, base.gate_up_proj, gu_pairs).chunk(2, dim=-1)
    h = F.silu(gate) * up
    dh = F.dropout(h, p, True) if p and "down" in pairs else h
    return proj(h, dh, base.down_proj, [("down", rows["down"])] if "down" in pairs else [])


CASES = [(ALL, "per_expert"), ({"gate_proj", "down_proj"}, "per_expert"), ({"up_proj"}, "per_expert"),
         ({"down_proj"}, "per_expert"), (ALL, "shared")]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("parts,rank_mode", CASES)
def test_split_lora_matches_reference_outputs_and_grads(parts, rank_mode, dropout):
    layer = _layer(parts, rank_mode, dropout).train()
    x, offsets, token_index = _routed()
    params = {k.split(".")[0]: p for k, p in layer.adapter_params("default")}
    ref_params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(x.shape[0], D)

    torch.manual_seed(123)
    y = layer(x1, offsets, token_index=token_index)
    torch.manual_seed(123)
    y_ref = _reference(layer, "default", ref_params, x2, offsets)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()

    def rel(a, b):  # max abs error relative to the reference's scale (itself O(1) here)
        return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()

    errs = {"out": rel(y, y_ref), "x.grad": rel(x1.grad, x2.grad)}
    errs |= {k: rel(params[k].grad, ref_params[k].grad) for k in params}
    print(f"parts={sorted(parts)} {rank_mode} p={dropout}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(v <= 1e-5 for v in errs.values()), errs
    assert all(params[k].grad.abs().sum() > 0 for k in params)
    if dropout:  # the mask really is applied (and the same in both)
        torch.manual_seed(123)
        with torch.no_grad():
            assert not torch.allclose(layer.eval()(x, offsets, token_index=token_index), y, atol=1e-4)


def test_grouped_fast_path_matches_loop_path():
    layer = _layer()
    x, offsets, token_index = _routed()
    y = layer(x, offsets, token_index=token_index)
    layer.base_layer.use_loop = True
    y_loop = layer(x, offsets, token_index=token_index)
    assert (y - y_loop).abs().max().item() <= 1e-5


@pytest.mark.parametrize("parts,rank_mode", CASES)
def test_zero_b_is_base_and_merge_roundtrip(parts, rank_mode):
    layer = _layer(parts, rank_mode)
    x, offsets, token_index = _routed()
    base = layer.base_layer
    w0 = (base.gate_up_proj.clone(), base.down_proj.clone())
    y_base = base(x, offsets, token_index=token_index)
    with torch.no_grad():
        y = layer(x, offsets, token_index=token_index)
        layer.merge("default")
        y_merged = layer(x, offsets, token_index=token_index)  # the merged adapter no longer runs
        layer.merge("default")  # idempotent
        layer.unmerge("default")
    print(f"merge {sorted(parts)} {rank_mode}: max|merged - unmerged| {(y - y_merged).abs().max():.1e}")
    assert (y - y_merged).abs().max().item() <= 1e-5
    assert not torch.allclose(y, y_base, atol=1e-3)
    for w, w_0 in zip((base.gate_up_proj, base.down_proj), w0):
        assert (w - w_0).abs().max().item() <= 1e-6
    with torch.no_grad():
        for key, p in layer.adapter_params("default"):
            if key.startswith("lora_B"):
                p.zero_()
    # exactly the base output (at the base weights as they now are: unmerge rounds at ~1e-7)
    assert torch.equal(layer(x, offsets, token_index=token_index), base(x, offsets, token_index=token_index))


def test_init_and_adapter_params():
    layer = LoraGroupedExperts(_experts())
    layer.add_adapter("k", LoraConfig(r=8, target_modules=["experts"]))
    layer.add_adapter("g", LoraConfig(r=8, init="gaussian", target_modules=["experts"]), parts={"down_proj"})
    names = dict(layer.adapter_params("k"))
    assert sorted(names) == ["lora_A_down.k", "lora_A_gate_up.k", "lora_B_down.k", "lora_B_gate_up.k"]
    a = names["lora_A_gate_up.k"]
    assert a.shape == (E, 8, D) and a.dtype == torch.float32
    assert a.abs().max() <= 1 / math.sqrt(D) and a.std() > 0.5 / math.sqrt(3 * D)
    assert names["lora_B_gate_up.k"].shape == (E, 2 * FH, 8) and not names["lora_B_gate_up.k"].any()
    ag = dict(layer.adapter_params("g"))["lora_A_down.g"]
    assert ag.shape == (E, 8, FH) and abs(ag.std().item() - 1 / 8) < 0.03
    assert layer.active == ["k"] and layer.adapter_names == ["k", "g"]
    layer.delete_adapter("k")
    assert layer.adapter_names == ["g"] and not dict(layer.adapter_params("k"))


def test_shared_rank_has_one_pair_per_projection():
    layer = _layer(rank_mode="shared")
    shapes = {k: tuple(p.shape) for k, p in layer.adapter_params()}
    assert shapes == {"lora_A_gate_up.default": (R, D), "lora_B_gate_up.default": (2 * FH, R),
                      "lora_A_down.default": (R, FH), "lora_B_down.default": (D, R)}


def test_dora_and_pissa_are_refused():
    layer = LoraGroupedExperts(_experts())
    with pytest.raises(AdapterError, match="use_dora is not supported on routed experts"):
        layer.add_adapter("d", LoraConfig(use_dora=True, target_modules=["experts"]))
    with pytest.raises(AdapterError, match="pissa"):
        layer.add_adapter("d", LoraConfig(init="pissa", target_modules=["experts"]))
    with pytest.raises(AdapterError, match="unknown parts"):
        layer.add_adapter("d", LoraConfig(target_modules=["experts"]), parts={"w1"})


def test_mixed_adapter_rows():
    layer = _layer(name="a")
    _layer({"gate_proj", "down_proj"}, name="b", layer=layer, seed=5)
    batch, seq = 3, 5
    x, offsets, token_index = _routed(batch, seq)
    sample = token_index // seq

    def run(names, active=None):
        layer.active = active or []
        with forward_context(ForwardContext(batch_size=batch, seq_len=seq, adapter_names=names)):
            return layer(x, offsets, token_index=token_index)

    mixed = run(["a", None, "b"])
    only_a, only_b, base = run(None, ["a"]), run(None, ["b"]), run(None, [])
    for s, want in enumerate([only_a, base, only_b]):
        assert (mixed[sample == s] - want[sample == s]).abs().max().item() <= 1e-6
    assert not torch.allclose(only_a, base) and not torch.allclose(only_b, base)
