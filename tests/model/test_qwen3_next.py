"""Hybrid linear-attention MoE (Qwen3-Next, Qwen3.5-MoE) vs transformers on tiny random checkpoints,
and the gated delta rule's chunked form vs its recurrence."""

import pytest
import torch

import moetune
from moetune.model import KVCache
from moetune.model.delta_rule import DeltaRuleInputs, causal_conv, chunk_gated_delta_rule, recurrent_gated_delta_rule
from moetune.model.generate import SamplingConfig, generate

from tiny_hybrid import CASES, make_hf

transformers = pytest.importorskip("transformers")


def _inputs(vocab: int, T: int = 80):
    """Three rows longer than one 64-token chunk: plain, left-padded, right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, T - 23 :] = 0  # at T=80 the padding spans the edge of the first 64-token chunk
    return ids, mask


_LOADED: dict = {}


def _load(name, tmp_path_factory):
    """(name, transformers model, our model, folder), built once per test module."""
    if name not in _LOADED:
        folder = tmp_path_factory.mktemp(name)
        hf = make_hf(name)
        hf.save_pretrained(folder)
        _LOADED[name] = name, hf, moetune.load_model(folder), folder
    return _LOADED[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """Each family: for what both must show (parity, names, packing, generation)."""
    return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    """Qwen3-Next alone: for what the two families share the code of (cache, loss, gradients)."""
    return _load("qwen3_next", tmp_path_factory)


def test_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    ids, mask = _inputs(128)
    with torch.no_grad():
        ref, got = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    err = (ref - got)[mask.bool()].abs().max().item()
    print(f"{name}: max|dlogits| padded batch {err:.2e} (logit scale {ref.abs().max():.2f})")
    assert err <= 1e-4
    assert torch.isfinite(got).all()  # padding positions too: a NaN there would poison attention and the loss


def test_names_match_transformers(pair):
    _, hf, ours, _ = pair
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in hf.named_parameters()}


def test_save_pretrained_round_trip(pair, tmp_path):
    _, hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = type(hf).from_pretrained(tmp_path).eval()
    ids, _ = _inputs(128, T=20)
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ours(ids).logits).abs().max() <= 1e-4


def test_packed_row_equals_documents_run_alone(pair):
    """Recurrence and convolution restart at each document: a packed row of three documents gives
    each document's logits as if it ran alone."""
    _, _, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 128, (n,), generator=g) for n in (23, 50, 19)]  # the second crosses a chunk edge
    row = torch.cat(docs)[None]
    segments = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = ours(row, position_ids=positions, segment_ids=segments).logits[0]
        alone = torch.cat([ours(d[None]).logits[0] for d in docs])
        leaky = ours(row, position_ids=positions).logits[0]  # no segments: state flows on
    err = (packed - alone).abs().max().item()
    print(f"packed vs alone max|dlogits| {err:.2e}")
    assert err <= 1e-5
    assert (leaky - alone).abs().max() > 1e-2


def test_cache_decoding_matches_full_forward(next_pair):
    _, _, ours, _ = next_pair
    ids, mask = _inputs(128, T=16)
    ids, mask = ids[:2], torch.cat((mask[1:2], torch.ones_like(mask[:1])))  # a left-padded row and a full one
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        cache = KVCache()
        steps = [ours(ids[:, :9], attention_mask=mask[:, :9], cache=cache).logits]
        for t in range(9, 16):
            steps.append(ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    real = mask.bool()
    assert (torch.cat(steps, dim=1) - full)[real].abs().max() < 1e-5


def test_greedy_generation_equals_transformers(pair):
    _, hf, ours, _ = pair
    prompts = [[5, 17, 99, 3, 42, 7], [11, 64, 2]]
    got = generate(ours, prompts, eos_id=None, pad_id=0, config=SamplingConfig(max_new_tokens=6))
    ids = torch.tensor([[5, 17, 99, 3, 42, 7], [0, 0, 0, 11, 64, 2]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ref[:, 6:].tolist() == got


def test_bf16_logits_follow_transformers_in_bf16(next_pair):
    """In bf16 (the training dtype) the DeltaNet layers round as transformers' do: the convolution
    sums in fp32 like a conv kernel, the delta rule runs in fp32."""
    _, _, _, folder = next_pair
    ours, hf = moetune.load_model(folder, dtype=torch.bfloat16), make_hf("qwen3_next").to(torch.bfloat16)
    ids, mask = _inputs(128, T=70)
    with torch.no_grad():
        ref, got = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    err = (ref.float() - got.float())[mask.bool()].abs().max().item()
    print(f"qwen3_next bf16 vs transformers bf16: max|dlogits| {err:.2e} (logit scale {ref.abs().max():.2f})")
    assert err <= 5e-2


def test_aux_loss_and_inspect(next_pair):
    name, hf, ours, folder = next_pair
    from moetune.inspect import inspect_model

    ids, mask = _inputs(128, T=20)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
        got = ours(ids, attention_mask=mask).aux_loss
    assert torch.allclose(ref.float(), got, atol=1e-5), (ref, got)
    report = inspect_model(folder)
    assert "gated DeltaNet" in report and ("in_proj_qkvz" in report) == (name == "qwen3_next")


def test_lora_gradients_through_chunked_equal_the_recurrence(next_pair, monkeypatch):
    """Every LoRA gradient (DeltaNet projections, attention, experts) is the same whether the
    DeltaNet layers run the chunked form or the token-by-token recurrence (the reference)."""
    import moetune.model.linear_attention as la

    _, _, _, folder = next_pair
    model = moetune.load_model(folder)
    targets = ["in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    moetune.add_adapter(model, moetune.LoraConfig(r=2, target_modules=[t for t in targets if t in names] + ["experts"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in moetune.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids, mask = _inputs(128, T=70)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        return {k: p.grad.clone() for k, p in moetune.trainable_parameters(model).items()}

    chunked = grads()
    monkeypatch.setattr(la, "chunk_gated_delta_rule", la.recurrent_gated_delta_rule)
    recurrent = grads()
    assert all(torch.isfinite(g).all() for g in [*chunked.values(), *recurrent.values()])
    scale = {k: recurrent[k].abs().max().clamp_min(1e-12) for k in recurrent}  # unrouted experts: zero grads
    worst = max(((chunked[k] - recurrent[k]).abs().max() / scale[k]).item() for k in chunked)
    print(f"LoRA grads, chunked vs recurrent DeltaNet: max relative diff {worst:.2e} over {len(chunked)} tensors")
    assert worst <= 3e-4  # fp32 rounding through four layers; the rule alone is held to 1e-5 below


# --- the delta rule itself -------------------------------------------------------------------


def _rule_inputs(B=2, T=45, H=3, Dk=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, Dk, generator=g), torch.randn(B, T, H, Dk, generator=g)
    v = torch.randn(B, T, H, Dv, generator=g)
    gate = -2 * torch.rand(B, T, H, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, [7, 16, 30]] = True  # boundaries inside a chunk and on a chunk edge (chunk 16 below)
    resets[1, 20] = True
    return q, k, v, gate, beta, resets


@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_equals_recurrent_outputs_and_gradients(with_resets):
    q, k, v, gate, beta, resets = _rule_inputs()
    resets = resets if with_resets else None
    state0 = torch.randn(2, 3, 8, 6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate, beta, state0)]
    probe = torch.randn(2, 45, 3, 6)

    def run(rule, **kw):
        a, b, c, d, e, s = leaves
        out, state = rule(DeltaRuleInputs(a, b, c, d, e, resets=resets, initial_state=s), **kw)
        grads = torch.autograd.grad((out * probe).sum() + state.square().sum(), leaves)
        return out, state, grads

    out_c, state_c, grads_c = run(chunk_gated_delta_rule, chunk_size=16)
    out_r, state_r, grads_r = run(recurrent_gated_delta_rule)
    assert (out_c - out_r).abs().max() <= 1e-5
    assert (state_c - state_r).abs().max() <= 1e-5
    for name, gc, gr in zip(("q", "k", "v", "gate", "beta", "state"), grads_c, grads_r):
        err = (gc - gr).abs().max().item()
        print(f"d/d{name}: chunked vs recurrent max|diff| {err:.2e} (scale {gr.abs().max():.2f})")
        assert err <= 1e-5 * max(1.0, gr.abs().max().item()), (name, err)


def test_delta_rule_matches_transformers_fallbacks():
    from transformers.models.qwen3_next import modeling_qwen3_next as ref

    q, k, v, gate, beta, _ = _rule_inputs()
    state0 = torch.randn(2, 3, 8, 6)
    kw = dict(initial_state=state0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    out_ref, state_ref = ref.torch_chunk_gated_delta_rule(q, k, v, gate, beta, chunk_size=16, **kw)
    out, state = chunk_gated_delta_rule(DeltaRuleInputs(q, k, v, gate, beta, initial_state=state0), chunk_size=16)
    assert (out - out_ref).abs().max() <= 1e-6 and (state - state_ref).abs().max() <= 1e-6
    out_ref, _ = ref.torch_recurrent_gated_delta_rule(q, k, v, gate, beta, **kw)
    out, _ = recurrent_gated_delta_rule(DeltaRuleInputs(q, k, v, gate, beta, initial_state=state0))
    assert (out - out_ref).abs().max() <= 1e-6


def test_causal_conv_restarts_and_carries_state():
    from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_fn

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 20, 5, generator=g), torch.randn(5, 4, generator=g)
    ref = causal_conv1d_fn(x.transpose(1, 2), w).transpose(1, 2)
    out, _ = causal_conv(x, w)
    assert (out - ref).abs().max() <= 1e-6
    resets = torch.zeros(1, 20, dtype=torch.bool)
    resets[0, 8] = True
    out, _ = causal_conv(x, w, resets=resets)
    assert (out[:, 8:] - causal_conv(x[:, 8:], w)[0]).abs().max() <= 1e-6
    first, state = causal_conv(x[:, :13], w, resets=resets[:, :13])  # stop mid-document, continue
    rest, _ = causal_conv(x[:, 13:], w, state=state)
    assert (torch.cat((first, rest), dim=1) - out).abs().max() <= 1e-6


def test_multi_token_prediction_module_is_skipped(next_pair, tmp_path):
    """Released Qwen3-Next / Qwen3.5 checkpoints carry an mtp.* module; like transformers we skip it."""
    import shutil

    from safetensors.torch import save_file

    _, _, _, folder = next_pair
    shutil.copytree(folder, tmp_path / "m")
    save_file({"mtp.fc.weight": torch.zeros(4, 8)}, str(tmp_path / "m" / "mtp.safetensors"))
    moetune.load_model(tmp_path / "m")


def test_fast_path_is_cuda_only_and_matches_the_reference(caplog):
    """flash-linear-attention's kernel runs only for CUDA tensors (never here on CPU); where a GPU and
    the package are present it agrees with the PyTorch form, packed resets included."""
    import logging

    from moetune.model.delta_rule_fast import fast_chunk_rule

    assert fast_chunk_rule(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the fast path is not used")
    with caplog.at_level(logging.INFO, logger="moetune"):
        rule = fast_chunk_rule(torch.device("cuda"))
    assert any("gated DeltaNet" in r.getMessage() for r in caplog.records)
    if rule is None:
        pytest.skip("flash-linear-attention is not installed")
    q, k, v, gate, beta, resets = (t.cuda() for t in _rule_inputs(T=200, Dk=16, Dv=16))
    state0 = torch.randn(2, 3, 16, 16, device="cuda")
    inputs = DeltaRuleInputs(q, k, v, gate, beta, resets=resets, initial_state=state0)
    ref, ref_state = chunk_gated_delta_rule(inputs)
    out, state = rule(inputs)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max() and (
        state - ref_state
    ).abs().max() <= 1e-3 * ref_state.abs().max()
