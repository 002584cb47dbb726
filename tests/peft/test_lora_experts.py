"""LoRA on grouped experts: split-LoRA vs a per-expert reference, invariants, PEFT parity and layouts."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moetune.config import LoraConfig
from moetune.errors import AdapterError
from moetune.peft.core.context import AdapterContext, adapter_context
from moetune.model.dispatch import dispatch
from moetune.model.moe import GroupedExperts
from moetune.peft.core.layer import AddOptions, disable_adapters
from moetune.peft.lora.experts import LoraGroupedExperts

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
    layer.add_adapter(
        name,
        LoraConfig(r=R, alpha=8.0, dropout=dropout, target_modules=["experts"], expert_rank=rank_mode),
        AddOptions(parts=frozenset(parts)),
    )
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


CASES = [
    (ALL, "per_expert"),
    ({"gate_proj", "down_proj"}, "per_expert"),
    ({"up_proj"}, "per_expert"),
    ({"down_proj"}, "per_expert"),
    (ALL, "shared"),
]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("parts,rank_mode", CASES)
def test_split_lora_matches_reference_outputs_and_grads(parts, rank_mode, dropout):
    _check_against_reference(_layer(parts, rank_mode, dropout), f"parts={sorted(parts)} {rank_mode} p={dropout}")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_separate_gate_up_pairs_match_reference(dropout):
    """Gate and up pairs with different A's (from a per-expert file): A's in one grouped GEMM."""
    layer = _layer(dropout=dropout)
    layer.load_per_expert_tensors("default", _distinct_gate_up(layer, seed=7), where="test")
    assert layer.pairs("default") == ["gate", "up", "down"]
    _check_against_reference(layer, f"separate gate/up p={dropout}")


def _check_against_reference(layer: LoraGroupedExperts, label: str) -> None:
    layer.train()
    dropout = layer.configs["default"].dropout
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
    print(f"{label}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
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
    layer.add_adapter(
        "g", LoraConfig(r=8, init="gaussian", target_modules=["experts"]), AddOptions(frozenset({"down_proj"}))
    )
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
    assert shapes == {
        "lora_A_gate_up.default": (R, D),
        "lora_B_gate_up.default": (2 * FH, R),
        "lora_A_down.default": (R, FH),
        "lora_B_down.default": (D, R),
    }


def test_dora_and_pissa_are_refused():
    layer = LoraGroupedExperts(_experts())
    with pytest.raises(AdapterError, match="use_dora is not supported on routed experts"):
        layer.add_adapter("d", LoraConfig(use_dora=True, target_modules=["experts"]))
    with pytest.raises(AdapterError, match="pissa"):
        layer.add_adapter("d", LoraConfig(init="pissa", target_modules=["experts"]))
    with pytest.raises(AdapterError, match="unknown parts"):
        layer.add_adapter("d", LoraConfig(target_modules=["experts"]), AddOptions(frozenset({"w1"})))


def test_mixed_adapter_rows():
    layer = _layer(name="a")
    _layer({"gate_proj", "down_proj"}, name="b", layer=layer, seed=5)
    batch, seq = 3, 5
    x, offsets, token_index = _routed(batch, seq)
    sample = token_index // seq

    def run(names, active=None):
        layer.active = active or []
        with adapter_context(AdapterContext(batch_size=batch, seq_len=seq, adapter_names=names)):
            return layer(x, offsets, token_index=token_index)

    mixed = run(["a", None, "b"])
    only_a, only_b, base = run(None, ["a"]), run(None, ["b"]), run(None, [])
    for s, want in enumerate([only_a, base, only_b]):
        assert (mixed[sample == s] - want[sample == s]).abs().max().item() <= 1e-6
    assert not torch.allclose(only_a, base) and not torch.allclose(only_b, base)


@pytest.mark.parametrize("names", [["a", None, "b", "c"], ["b", "a", "b", None]])
def test_mixed_adapter_rows_gradients_equal_each_adapter_on_its_rows(names):
    """Each adapter runs on its own block of routed rows only (regrouped by adapter, then put
    back): outputs and gradients (adapters and input) equal plain autograd through every adapter
    run on all rows, each row then taking its own sample's result. Float64: exact to rounding."""
    layer = _layer(name="a").double()
    _layer({"gate_proj", "down_proj"}, name="b", layer=layer, seed=5).double()
    _layer({"up_proj"}, rank_mode="shared", name="c", layer=layer, seed=7).double()
    batch, seq = 4, 5
    x, offsets, token_index = _routed(batch, seq)
    x = x.double().requires_grad_()
    sample = token_index // seq
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    params = dict(layer.adapter_params())

    def grads(y):
        return torch.autograd.grad((y * g).sum(), [x, *params.values()], allow_unused=True)

    layer.active = []
    with adapter_context(AdapterContext(batch_size=batch, seq_len=seq, adapter_names=names)):
        mixed = layer(x, offsets, token_index=token_index)
    ref = layer(x, offsets, token_index=token_index)  # the base, for samples without an adapter
    for n in {n for n in names if n is not None}:
        layer.active = [n]
        alone = layer(x, offsets, token_index=token_index)
        mine = torch.tensor([names[s] == n for s in sample.tolist()]).unsqueeze(1)
        ref = torch.where(mine, alone, ref)
    assert (mixed - ref).abs().max() < 1e-12
    for got, want in zip(grads(mixed), grads(ref)):
        assert (got is None) == (want is None) and (got is None or (got - want).abs().max() < 1e-12)


# --- PEFT parity: tiny transformers models, PEFT `target_parameters` on the fused experts ----------

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

from tiny_hf import save_hf_model  # noqa: E402

PEFT_R, PEFT_ALPHA = 4, 8


def _wrap_experts(model, config: LoraConfig, parts=ALL, patterns: dict | None = None) -> dict[str, LoraGroupedExperts]:
    """Wrap every GroupedExperts by hand (what moetune.add_adapter does for target 'experts');
    ``patterns``: a PEFT adapter_config whose rank/alpha patterns give per-parameter configs."""
    layers = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, GroupedExperts):
            parent, _, child = path.rpartition(".")
            layers[path] = LoraGroupedExperts(module)
            setattr(model.get_submodule(parent), child, layers[path])
            per_param = None
            if patterns:
                ranks, alphas = patterns.get("rank_pattern") or {}, patterns.get("alpha_pattern") or {}
                per_param = {
                    p: dataclasses.replace(
                        config,
                        r=ranks.get(f"{path}.{p}", config.r),
                        alpha=float(alphas.get(f"{path}.{p}", config.alpha)),
                    )
                    for p in ("gate_up_proj", "down_proj")
                }
            layers[path].add_adapter("default", config, AddOptions(frozenset(parts), per_param))
    return layers


def _peft_config(params=("gate_up_proj", "down_proj"), **kw):
    return peft.LoraConfig(
        r=PEFT_R, lora_alpha=PEFT_ALPHA, target_modules=[], target_parameters=[f"mlp.experts.{p}" for p in params], **kw
    )


def _ids(vocab):
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(3))


def _randomize(params, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _export(layers, out_dir, config: peft.LoraConfig, name="default"):
    """Write a PEFT adapter folder from our tensors (what io.save_adapter will do)."""
    tensors, targets, ranks, alphas = {}, set(), {}, {}
    for path, layer in layers.items():
        tensors |= {f"base_model.model.{path}.{k}": v for k, v in layer.peft_tensors(name).items()}
        entry = layer.peft_config_targets(path, name)
        targets |= set(entry["target_parameters"])
        ranks |= entry.get("rank_pattern", {})
        alphas |= entry.get("alpha_pattern", {})
    config.target_parameters, config.rank_pattern, config.alpha_pattern = sorted(targets), ranks, alphas
    config.save_pretrained(out_dir)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))


def _peft_logits(folder, adapter_dir, ids):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf, adapter_dir).eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_peft_layout_and_logits_parity(family, tmp_path):
    import moetune
    from peft import get_peft_model, get_peft_model_state_dict

    hf = save_hf_model(family, tmp_path / "model")
    ours = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    pm = get_peft_model(hf, _peft_config()).eval()
    _randomize(p for n, p in pm.named_parameters() if "lora_" in n)
    state = get_peft_model_state_dict(pm)

    layers = _wrap_experts(ours, LoraConfig(r=PEFT_R, alpha=PEFT_ALPHA, target_modules=["experts"]))
    cfg = hf.config
    E, D, Fh = (
        getattr(cfg, "num_experts", None) or cfg.num_local_experts,
        cfg.hidden_size,
        getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size,
    )
    r = PEFT_R
    for path, layer in layers.items():
        prefix = f"base_model.model.{path}."
        mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        # the layout PEFT 0.21 writes: gate_up_proj inner (base_layer.), down_proj outer, no param name
        assert {k: tuple(v.shape) for k, v in mine.items()} == {
            "base_layer.lora_A.weight": (E * r, D),
            "base_layer.lora_B.weight": (2 * Fh, r * E),
            "lora_A.weight": (E * r, Fh),
            "lora_B.weight": (D, r * E),
        }
        layer.load_peft_tensors("default", mine, where=path)
        # expert ordering: A expert-slowest (row e*r+i), B expert-fastest (column i*E+e)
        a, b = layer.lora_A_gate_up["default"], layer.lora_B_gate_up["default"]
        assert torch.equal(a[1, 2], mine["base_layer.lora_A.weight"][1 * r + 2])
        assert torch.equal(b[1, :, 2], mine["base_layer.lora_B.weight"][:, 2 * E + 1])
        assert {k: torch.equal(v, mine[k]) for k, v in layer.peft_tensors("default").items()} == dict.fromkeys(
            mine, True
        )

    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        ref, got = pm(input_ids=ids).logits, ours(ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    err = (ref - got).abs().max().item()
    print(f"{family}: PEFT vs moetune logits max|d| {err:.2e} (scale {ref.abs().max():.2f})")
    assert err <= 1e-4
    assert (ref - base).abs().max() > 1e-2  # the adapter matters


def _distinct_gate_up(layer: LoraGroupedExperts, seed: int) -> dict[str, torch.Tensor]:
    """Per-expert tensors as a PEFT-v4 / vLLM file has them: gate and up pairs with different A's."""
    tensors = layer.per_expert_tensors("default")
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in tensors.items()}


EXPORTS = [
    ("all", ALL, "per_expert", False),
    ("shared", ALL, "shared", False),
    ("gate_only", {"gate_proj"}, "per_expert", False),
    ("up_down", {"up_proj", "down_proj"}, "per_expert", False),
    ("down_only", {"down_proj"}, "per_expert", True),
    ("separate", ALL, "per_expert", False),
    ("separate_rslora", ALL, "per_expert", True),
]


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys")  # PEFT checks modules only
@pytest.mark.parametrize("case,parts,rank_mode,rslora", EXPORTS, ids=[c[0] for c in EXPORTS])
def test_saved_adapter_loads_in_peft_with_our_logits(case, parts, rank_mode, rslora, tmp_path):
    import moetune

    save_hf_model("qwen3_moe", tmp_path / "model")
    ours = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    config = LoraConfig(
        r=PEFT_R, alpha=PEFT_ALPHA, use_rslora=rslora, target_modules=["experts"], expert_rank=rank_mode
    )
    layers = _wrap_experts(ours, config, parts)
    for i, layer in enumerate(layers.values()):
        if case.startswith("separate"):
            layer.load_per_expert_tensors("default", _distinct_gate_up(layer, seed=10 + i), where="test")
            assert layer.pairs("default") == ["gate", "up", "down"]
        else:
            _randomize((p for _, p in layer.adapter_params("default")), seed=10 + i)
    _export(
        layers,
        tmp_path / "adapter",
        peft.LoraConfig(r=PEFT_R, lora_alpha=PEFT_ALPHA, use_rslora=rslora, target_modules=[]),
    )
    ids = _ids(128)
    with torch.no_grad():
        got = ours(ids).logits
    ref = _peft_logits(tmp_path / "model", tmp_path / "adapter", ids)
    with torch.no_grad(), disable_adapters(ours):
        base = ours(ids).logits
    err = (ref - got).abs().max().item()
    print(f"{case}: our adapter file in PEFT, logits max|d| {err:.2e} (adapter effect {(got - base).abs().max():.2f})")
    assert err <= 1e-4
    assert (got - base).abs().max() > 1e-2

    # and back: a fresh moetune model reading the same folder gives the same logits; rank/alpha
    # patterns become per-parameter configs (separate gate/up pairs come back as one rank-2r pair)
    again = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for path, layer in _wrap_experts(again, config, parts, patterns=saved).items():
        prefix = f"base_model.model.{path}."
        layer.load_peft_tensors(
            "default", {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, where=path
        )
    with torch.no_grad():
        assert (again(ids).logits - got).abs().max().item() <= 1e-6


def _wrap_fresh(layer: LoraGroupedExperts, config: LoraConfig, parts) -> LoraGroupedExperts:
    fresh = LoraGroupedExperts(layer.base_layer)
    fresh.add_adapter("default", config, AddOptions(frozenset(parts)))
    return fresh


def test_per_expert_layout_roundtrip():
    layer = _layer()
    tensors = layer.per_expert_tensors("default")
    assert len(tensors) == E * 3 * 2
    assert tensors["2.gate_proj.lora_A.weight"].shape == (R, D) and tensors["2.up_proj.lora_B.weight"].shape == (FH, R)
    assert tensors["2.down_proj.lora_A.weight"].shape == (R, FH) and tensors["2.down_proj.lora_B.weight"].shape == (
        D,
        R,
    )
    # a fused pair is a gate pair and an up pair that share A
    assert torch.equal(tensors["1.gate_proj.lora_A.weight"], tensors["1.up_proj.lora_A.weight"])
    assert torch.equal(tensors["1.up_proj.lora_B.weight"], layer.lora_B_gate_up["default"][1, FH:])
    x, offsets, token_index = _routed()
    fresh = _wrap_fresh(layer, layer.configs["default"], ALL)
    fresh.load_per_expert_tensors("default", tensors, where="test")
    assert fresh.pairs("default") == ["gate_up", "down"]  # shared A detected: stays fused
    assert torch.equal(fresh(x, offsets, token_index=token_index), layer(x, offsets, token_index=token_index))


def test_bad_adapter_tensors_name_the_key():
    layer = _layer()
    good = layer.peft_tensors("default")
    with pytest.raises(AdapterError, match="missing tensor.*'lora_B.weight'"):
        layer.load_peft_tensors(
            "default", {k: v for k, v in good.items() if k != "lora_B.weight"}, where="f.safetensors"
        )
    with pytest.raises(AdapterError, match="'gate_up_proj.lora_A.weight'.* map to nothing"):
        layer.load_peft_tensors("default", good | {"gate_up_proj.lora_A.weight": good["lora_A.weight"]}, where="f")
    with pytest.raises(
        AdapterError, match=r"f: tensor 'base_layer.lora_A.weight' has shape \(32, 32\), expected \(16, 32\)"
    ):
        layer.load_peft_tensors("default", good | {"base_layer.lora_A.weight": torch.zeros(32, D)}, where="f")
    gate_only = _layer({"gate_proj"})
    with pytest.raises(AdapterError, match="outside the gate block is non-zero"):
        gate_only.load_peft_tensors(
            "default",
            {k.removeprefix("base_layer."): v for k, v in good.items() if k.startswith("base_layer.")},
            where="f",
        )
    shared = _layer(rank_mode="shared")
    with pytest.raises(AdapterError, match="differs across experts.*expert_rank='shared'"):
        shared.load_peft_tensors("default", good, where="f")
    per_expert = layer.per_expert_tensors("default")
    del per_expert["3.down_proj.lora_B.weight"]
    with pytest.raises(AdapterError, match=r"missing tensor.*3.down_proj.lora_B.weight"):
        layer.load_per_expert_tensors("default", per_expert, where="f")


def test_peft_config_targets():
    layer = _layer({"gate_proj", "down_proj"})
    assert layer.peft_config_targets("model.layers.0.mlp.experts") == {
        "target_parameters": ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    }
    assert set(_layer({"down_proj"}).peft_tensors("default")) == {"lora_A.weight", "lora_B.weight"}


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys")
def test_peft_rank_pattern_on_experts_loads_exactly(tmp_path):
    """A PEFT adapter whose gate_up_proj has its own rank and alpha (rank_pattern/alpha_pattern)."""
    import moetune
    from peft import get_peft_model, get_peft_model_state_dict

    hf = save_hf_model("qwen3_moe", tmp_path / "model")
    ours = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    pcfg = _peft_config(rank_pattern={"gate_up_proj": 8}, alpha_pattern={"gate_up_proj": 24})
    pm = get_peft_model(hf, pcfg).eval()
    _randomize(p for n, p in pm.named_parameters() if "lora_" in n)
    state = get_peft_model_state_dict(pm)
    patterns = {"rank_pattern": {}, "alpha_pattern": {}}
    for path in (p for p, m in ours.named_modules() if isinstance(m, GroupedExperts)):
        patterns["rank_pattern"][f"{path}.gate_up_proj"] = 8
        patterns["alpha_pattern"][f"{path}.gate_up_proj"] = 24
    config = LoraConfig(r=PEFT_R, alpha=PEFT_ALPHA, target_modules=["experts"])
    for path, layer in _wrap_experts(ours, config, patterns=patterns).items():
        prefix = f"base_model.model.{path}."
        layer.load_peft_tensors(
            "default", {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, where=path
        )
        assert layer.lora_A_gate_up["default"].shape == (layer.num_experts, 8, layer.dim)
        assert layer.scaling("default", "gate_up_proj") == 3.0 and layer.scaling("default", "down_proj") == 2.0
        targets = layer.peft_config_targets(path, "default")
        assert targets["rank_pattern"] == {f"{path}.gate_up_proj": 8, f"{path}.down_proj": 4}
        assert targets["alpha_pattern"] == {f"{path}.gate_up_proj": 24.0, f"{path}.down_proj": 8.0}
    ids = _ids(128)
    with torch.no_grad():
        err = (pm(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    print(f"rank_pattern on gate_up_proj: PEFT vs moetune logits max|d| {err:.2e}")
    assert err <= 1e-4


# --- through the public API (moetune.add_adapter / save_adapter / load_adapter) ------------------


def _randomize_model_adapters(model, seed=21):
    from moetune.peft.core.layer import adapter_layers

    _randomize((p for _, layer in adapter_layers(model) for _, p in layer.adapter_params()), seed=seed)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys")
def test_public_api_roundtrip_with_peft(tmp_path):
    import moetune
    from peft import get_peft_model

    save_hf_model("qwen3_moe", tmp_path / "model")
    ids = _ids(128)
    ours = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    moetune.add_adapter(ours, LoraConfig(r=PEFT_R, alpha=PEFT_ALPHA, target_modules=["q_proj", "v_proj", "experts"]))
    assert all(isinstance(m, LoraGroupedExperts) for p, m in ours.named_modules() if p.endswith("mlp.experts"))
    _randomize_model_adapters(ours)
    with torch.no_grad():
        got = ours(ids).logits
    for layout_name in ("peft", "per_expert"):
        moetune.save_adapter(ours, tmp_path / layout_name, layout=layout_name)
        fresh = moetune.load_model(tmp_path / "model", dtype=torch.float32)
        moetune.load_adapter(fresh, tmp_path / layout_name)
        with torch.no_grad():
            assert (fresh(ids).logits - got).abs().max().item() <= 1e-6, layout_name
    err = (_peft_logits(tmp_path / "model", tmp_path / "peft", ids) - got).abs().max().item()
    print(f"moetune.save_adapter (q,v,experts) -> PeftModel.from_pretrained: logits max|d| {err:.2e}")
    assert err <= 1e-4

    # a folder PEFT itself wrote (attention + target_parameters) reads back with PEFT's logits
    pm = get_peft_model(
        save_hf_model("qwen3_moe", tmp_path / "model2"),
        peft.LoraConfig(
            r=PEFT_R,
            lora_alpha=PEFT_ALPHA,
            target_modules=["q_proj", "v_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    ).eval()
    _randomize(p for n, p in pm.named_parameters() if "lora_" in n)
    pm.save_pretrained(tmp_path / "from_peft")
    mine = moetune.load_model(tmp_path / "model2", dtype=torch.float32)
    moetune.load_adapter(mine, tmp_path / "from_peft")
    with torch.no_grad():
        err = (pm(input_ids=ids).logits - mine(ids).logits).abs().max().item()
    print(f"PeftModel.save_pretrained -> moetune.load_adapter: logits max|d| {err:.2e}")
    assert err <= 1e-4


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys")
def test_public_api_separate_gate_up_roundtrip(tmp_path):
    """A per-expert file whose gate and up A's differ (PEFT v4 / vLLM) -> separate pairs -> PEFT
    layout at rank 2r with rank/alpha patterns -> PEFT and moetune read it with the same logits."""
    import moetune
    from moetune.peft.core import inject

    if "param_configs" not in inspect.getsource(inject):
        pytest.skip("inject.add_adapter does not pass per-parameter configs yet")
    save_hf_model("qwen3_moe", tmp_path / "model")
    ids = _ids(128)
    ours = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    moetune.add_adapter(ours, LoraConfig(r=PEFT_R, alpha=PEFT_ALPHA, use_rslora=True, target_modules=["experts"]))
    for i, (path, m) in enumerate((p, m) for p, m in ours.named_modules() if isinstance(m, LoraGroupedExperts)):
        m.load_per_expert_tensors("default", _distinct_gate_up(m, seed=30 + i), where=path)
    moetune.save_adapter(ours, tmp_path / "v4", layout="per_expert")
    with torch.no_grad():
        got = ours(ids).logits
    again = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    moetune.load_adapter(again, tmp_path / "v4")
    assert {m.pairs("default")[0] for m in again.modules() if isinstance(m, LoraGroupedExperts)} == {"gate"}
    moetune.save_adapter(again, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    gate_up_rank = saved["rank_pattern"].get("model.layers.0.mlp.experts.gate_up_proj", saved["r"])
    assert gate_up_rank == 2 * PEFT_R, saved
    err = (_peft_logits(tmp_path / "model", tmp_path / "peft", ids) - got).abs().max().item()
    print(f"separate gate/up -> PEFT rank-2r file -> PeftModel: logits max|d| {err:.2e}")
    assert err <= 1e-4
    last = moetune.load_model(tmp_path / "model", dtype=torch.float32)
    moetune.load_adapter(last, tmp_path / "peft")
    with torch.no_grad():
        assert (last(ids).logits - got).abs().max().item() <= 1e-5
