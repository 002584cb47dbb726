"""NF4 (QLoRA) base weights: the format, its error bound, 4-bit loading, and QLoRA training."""

from __future__ import annotations

import copy
import importlib.util
import threading

import pytest
import torch
import torch.nn.functional as F

import moetune
from moetune.errors import AdapterError, CheckpointError
from moetune.model.quant import nf4, nf4_pieces
from moetune.model.moe import GroupedExperts
from moetune.model.quant import (
    NF4Weight,
    QuantGroupedExperts,
    QuantLinear,
    dequantize_model,
    quantize_model,
    quantized_bytes,
    quantized_weights,
)
from tiny_hf import save_hf_model

# Odd sizes and partial blocks on purpose: expert halves of 22*48 elements straddle 64-blocks.
ODD_MOE = (
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    dict(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        vocab_size=96,
        max_position_embeddings=128,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=22,
        norm_topk_prob=True,
    ),
)


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe")
    save_hf_model("qwen3_moe", folder)
    return folder


@pytest.fixture(scope="module")
def odd_moe_dir(tmp_path_factory):
    import tiny_hf

    tiny_hf.CASES.setdefault("odd_moe", ODD_MOE)
    folder = tmp_path_factory.mktemp("odd_moe")
    save_hf_model("odd_moe", folder)
    return folder


def _roundtrip(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized w, exact first-level absmax, double-quantized absmax) per block."""
    codes, absmax = nf4.quantize_blocks(w)
    absmax_hat = nf4.dequantize_scales(*nf4.quantize_scales(absmax))
    return nf4.dequantize_blocks(codes, absmax_hat, w.numel(), torch.float32).view(w.shape), absmax, absmax_hat


# --- the format ---------------------------------------------------------------------------
def test_nf4_code_values_are_qloras_normal_quantiles():
    # QLoRA's construction: 8 positive and 7 negative N(0,1) quantiles, zero, scaled to [-1, 1].
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    assert torch.allclose((levels / levels.max()).float(), nf4.NF4_CODE, atol=1e-7, rtol=0)
    assert nf4.NF4_CODE[7] == 0 and nf4.NF4_CODE[0] == -1 and nf4.NF4_CODE[15] == 1


def test_exact_code_values_roundtrip():
    # A block holding each level times its absmax comes back bit-exact with the right indices.
    block = torch.cat([nf4.NF4_CODE, nf4.NF4_CODE.flip(0), nf4.NF4_CODE, nf4.NF4_CODE]) * 0.37
    codes, absmax = nf4.quantize_blocks(block)
    idx = torch.stack([codes >> 4, codes & 15], dim=1).view(-1).long()
    assert torch.equal(nf4.NF4_CODE[idx] * 0.37, block)
    assert torch.equal(nf4.dequantize_blocks(codes, absmax, 64, torch.float32), block)


@pytest.mark.parametrize("shape", [(64, 64), (7, 33), (3, 1000), (1,), (5, 64 * 257 + 3)])
def test_per_element_error_within_nf4_bound(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::97] *= 40  # outliers: blocks with very different absmax
    deq, absmax, absmax_hat = _roundtrip(w)
    half_gap = (nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max() / 2  # 0.1385, between 0.723 and 1.0
    n = w.numel()
    per_elem = lambda t: t.repeat_interleave(nf4.BLOCK)[:n].view(shape)  # noqa: E731
    bound = half_gap * per_elem(absmax) + per_elem((absmax - absmax_hat).abs())
    assert ((w - deq).abs() <= bound * (1 + 1e-6) + 1e-12).all()
    # The double-quantized scales obey the 8-bit map's own bound (per 256 scales).
    dyn_half_gap = (nf4.DYNAMIC_CODE[1:] - nf4.DYNAMIC_CODE[:-1]).max() / 2
    _, scale, _ = nf4.quantize_scales(absmax)
    per_scale = scale.repeat_interleave(nf4.SCALE_BLOCK)[: absmax.numel()]
    assert ((absmax - absmax_hat).abs() <= dyn_half_gap * per_scale * (1 + 1e-6) + 1e-12).all()
    print(
        f"shape {shape}: max |w - deq| / block absmax = {((w - deq).abs() / per_elem(absmax)).max():.4f} "
        f"(bound {half_gap:.4f} + scale error)"
    )


def test_piecewise_writes_in_any_order_equal_whole_quantization():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1003, generator=g)
    whole = nf4.quantize_blocks(w)
    cuts = [0, 5, 64, 70, 128, 500, 501, 777, 1003]
    pieces = list(zip(cuts[:-1], cuts[1:]))
    order = torch.randperm(len(pieces), generator=g).tolist()
    q = nf4_pieces.BlockQuantizer(w.numel(), torch.device("cpu"))
    finished = [q.write(pieces[i][0], w[pieces[i][0] : pieces[i][1]]) for i in order]
    assert finished[-1] and not any(finished[:-1])
    codes, absmax_codes, scale, offset = q.result()
    assert torch.equal(codes, whole[0])
    assert torch.equal((absmax_codes, scale, offset)[0], nf4.quantize_scales(whole[1])[0])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("n", [64 * 8, 999, 64 * 300])
def test_codes_match_bitsandbytes(n):
    import bitsandbytes.functional as bnbf

    w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes, absmax = nf4.quantize_blocks(w)
    assert torch.equal(packed.view(-1), codes)  # 4-bit codes and packing, bit for bit
    assert torch.equal(bnbf.create_dynamic_map(), nf4.DYNAMIC_CODE)
    absmax_codes, scale, offset = nf4.quantize_scales(absmax)
    assert torch.equal(state.state2.absmax, scale) and torch.equal(state.offset, offset)
    # Ours rounds every scale to the nearest 8-bit level; bitsandbytes' CPU kernel (a binary
    # search) very rarely picks the neighbour, so compare the reconstruction errors instead.
    ref = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    mine = nf4.dequantize_scales(absmax_codes, scale, offset)
    assert ((mine - absmax).abs() <= (ref - absmax).abs() + 1e-9).all()
    assert (absmax_codes != state.absmax).float().mean() < 0.01


# --- modules ------------------------------------------------------------------------------
def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_quant_linear_and_experts_recompute_weight_for_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(80, 48, bias=True)
    q = QuantLinear.from_linear(linear)
    assert isinstance(q, torch.nn.Linear) and (q.in_features, q.out_features) == (80, 48)
    x = torch.randn(5, 80, requires_grad=True)
    assert (48, 80) not in _saved_shapes(lambda: q(x).pow(2).sum().backward())
    ref = x.detach().clone().requires_grad_()
    F.linear(ref, q.dequantized_weight(), q.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, ref.grad, atol=1e-6)

    experts = GroupedExperts(num_experts=4, dim=48, hidden=24)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    qe = QuantGroupedExperts.from_experts(experts)
    rows, offsets = torch.randn(11, 48, requires_grad=True), torch.tensor([2, 2, 7, 11], dtype=torch.int32)
    shapes = _saved_shapes(lambda: qe(rows, offsets, token_index=None).pow(2).sum().backward())
    assert (4, 48, 48) not in shapes and (4, 48, 24) not in shapes
    plain = dequantize_model(torch.nn.ModuleDict({"e": copy.deepcopy(qe)}))["e"]
    ref = rows.detach().clone().requires_grad_()
    plain(ref, offsets, token_index=None).pow(2).sum().backward()
    assert torch.allclose(rows.grad, ref.grad, atol=1e-6)


def test_to_dtype_keeps_fp32_scales():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32))
    before = q.dequantized_weight()
    q.to(torch.bfloat16)
    assert q.stored.absmax_scale.dtype == torch.float32 and q.weight.dtype == torch.bfloat16
    assert torch.equal(q.weight.float(), before.bfloat16().float())


# --- loading ------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_load_nf4_quantizes_linears_and_experts(odd_moe_dir, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: the pieces are quantized by the CPU workers
    try:
        model = moetune.load_model(odd_moe_dir, quantize="nf4")
    finally:
        torch.set_num_threads(before)
    assert not [t for t in threading.enumerate() if t.name.startswith("moetune-cpu-worker")]  # stopped after
    names = set(quantized_weights(model))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= names
    full = dict(model.named_parameters())
    assert "lm_head.weight" in full and "model.embed_tokens.weight" in full and "model.layers.0.mlp.gate.weight" in full
    assert not any(h.pending for h in model.modules() if isinstance(h, NF4Weight))
    # Piecewise quantization while loading (expert halves straddle blocks) == quantizing the whole.
    ref = quantize_model(moetune.load_model(odd_moe_dir))
    for name, holder in quantized_weights(ref).items():
        other = quantized_weights(model)[name]
        assert torch.equal(holder.codes, other.codes) and torch.equal(holder.absmax_codes, other.absmax_codes), name


def test_bytes_per_parameter(qwen3_moe_dir):
    model = moetune.load_model(qwen3_moe_dir, quantize="nf4")
    stored, count = quantized_bytes(model)
    print(f"4-bit bytes per quantized parameter: {stored / count:.4f} ({stored} bytes / {count} params)")
    assert stored / count <= 0.56


def test_quantized_logits_close_to_fp32(qwen3_moe_dir):
    full = moetune.load_model(qwen3_moe_dir)
    quant = moetune.load_model(qwen3_moe_dir, quantize="nf4")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = full(ids).logits, quant(ids).logits
    # Exactly the model of its dequantized weights ...
    c = dequantize_model(copy.deepcopy(quant))(ids).logits
    assert torch.allclose(b, c, atol=1e-5)
    # ... and close to the fp32 one (NF4 error ~9% per weight on these random Gaussian weights).
    rel = ((a - b).norm() / a.norm()).item()
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    print(f"nf4 vs fp32 logits: relative error {rel:.4f}, cosine {cos:.4f}, max abs {(a - b).abs().max():.4f}")
    assert rel < 0.4 and cos > 0.92


def test_bad_quantize_value(qwen3_moe_dir):
    with pytest.raises(CheckpointError, match="quantize='int8'"):
        moetune.load_model(qwen3_moe_dir, quantize="int8")


def test_save_pretrained_writes_dequantized_weights(qwen3_moe_dir, tmp_path):
    quant = moetune.load_model(qwen3_moe_dir, quantize="nf4")
    quant.save_pretrained(tmp_path / "out")
    back = moetune.load_model(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 9))
    assert torch.allclose(back(ids).logits, quant(ids).logits, atol=1e-5)


# --- QLoRA --------------------------------------------------------------------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]


def test_qlora_training_lowers_loss(qwen3_moe_dir):
    model = moetune.load_model(qwen3_moe_dir, quantize="nf4")
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, dropout=0.05, target_modules=TARGETS))
    before = {k: v.clone() for k, v in model.state_dict().items() if "stored" in k or "experts.base_layer" in k}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    model.train()
    losses = []
    for _ in range(6):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    print("QLoRA losses:", [round(x, 3) for x in losses])
    assert losses[-1] < losses[0] - 0.3
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())  # 4-bit base untouched


def test_lora_grads_through_4bit_base_equal_dequantized_base(qwen3_moe_dir):
    quant = moetune.load_model(qwen3_moe_dir, quantize="nf4")
    moetune.add_adapter(quant, moetune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=TARGETS))
    with torch.no_grad():  # non-zero B so the adapters shape the loss
        for name, p in quant.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    plain = dequantize_model(copy.deepcopy(quant))
    assert not any(isinstance(m, NF4Weight) for m in plain.modules())
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    grads = []
    for model in (quant, plain):
        model.train()
        torch.manual_seed(11)  # same dropout masks
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    print(f"max |grad difference| over {len(grads[0])} LoRA tensors: {worst:.2e}")
    assert worst <= 1e-5


def test_merge_into_4bit_base_is_refused(qwen3_moe_dir):
    model = moetune.load_model(qwen3_moe_dir, quantize="nf4")
    moetune.add_adapter(model, moetune.LoraConfig(r=2, target_modules=["q_proj", "experts"]))
    with pytest.raises(AdapterError, match="held quantized"):
        model.model.layers[0].self_attn.q_proj.merge("default")
    with pytest.raises(AdapterError, match="held quantized"):
        model.model.layers[0].mlp.experts.merge("default")
    with pytest.raises(AdapterError, match="pissa"):
        moetune.add_adapter(model, moetune.LoraConfig(r=2, init="pissa", target_modules=["o_proj"]), name="p")
