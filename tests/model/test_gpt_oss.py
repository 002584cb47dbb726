"""gpt-oss (sinks, sliding windows, biased clamped experts) vs transformers on a tiny random checkpoint."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import moetune
from moetune.errors import CheckpointError
from moetune.inspect import inspect_model
from moetune.model import KVCache
from moetune.model.families import model_args_from_hf
from moetune.model.generate import SamplingConfig, generate
from tiny_gpt_oss import make_hf
from tiny_hf import padded_batch  # 12 tokens: three times the window of 4

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The transformers model and the folder it saved itself to."""
    folder = tmp_path_factory.mktemp("gpt_oss") / "hf"
    hf = make_hf()
    hf.save_pretrained(folder)
    return hf, folder


def test_logits_loss_and_aux_loss_match_transformers(saved):
    hf, folder = saved
    ours = moetune.load_model(folder, dtype=torch.float32)
    ids, mask = padded_batch(128)
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 4] = -100  # first real token after left padding: transformers would score a pad position on it
    with torch.no_grad():
        err = (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item()
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        got = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    real = mask.bool()
    err_pad = (ref.logits[real] - got.logits[real]).abs().max().item()
    print(
        f"gpt_oss: max|dlogits| no pad {err:.2e}, padded {err_pad:.2e} (logit scale {ref.logits.abs().max():.2f}); "
        f"loss {ref.loss.item():.6f} vs {got.loss.item():.6f}, "
        f"aux {ref.aux_loss.item():.6f} vs {got.aux_loss.item():.6f}"
    )
    assert err <= 1e-4 and err_pad <= 1e-4
    # transformers' loss already includes coef * aux_loss when output_router_logits is set
    coef = hf.config.router_aux_loss_coef
    assert abs(ref.loss.item() - coef * ref.aux_loss.item() - got.loss.item()) < 1e-5
    assert abs(ref.aux_loss.item() - got.aux_loss.item()) < 1e-5


def test_sinks_clamps_and_biases_are_exercised(saved):
    """The parity case would fail if any gpt-oss detail were dropped: each changes the logits."""
    _, folder = saved
    ours = moetune.load_model(folder)
    ids, _ = padded_batch(128)
    seen = []
    experts = ours.model.layers[0].mlp.experts
    hook = experts.register_forward_pre_hook(lambda _module, args: seen.append(args))  # (rows, offsets)
    with torch.no_grad():
        base = ours(ids).logits
        hook.remove()
        gate_up = experts.project_gate_up(*seen[0])
        assert (gate_up[:, :16] > 7).any() and (gate_up[:, 16:].abs() > 7).any()  # both clamps cut
        for name in ("sinks", "experts.gate_up_proj_bias", "experts.down_proj_bias", "router.bias"):
            model = copy.deepcopy(ours)
            for pname, p in model.named_parameters():
                if pname.endswith(name):
                    p.zero_()
            assert (model(ids).logits - base).abs().max() > 1e-2, name


def test_names_match_transformers(saved):
    hf, folder = saved
    ours = moetune.load_model(folder)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in hf.named_parameters()}
    assert tuple(ours.model.layers[0].mlp.experts.gate_up_proj.shape) == (8, 64, 64)  # (E, 2F, D) in memory
    assert ours.args.sliding_window == [4, None, 4]


def test_save_pretrained_round_trip_is_byte_exact(saved, tmp_path):
    """Load transformers' checkpoint and write it back: the same keys and bit-identical tensors
    (experts transposed and interleaved again), and transformers reads it to the same logits."""
    hf, folder = saved
    ours = moetune.load_model(folder)
    ours.save_pretrained(tmp_path / "ours")
    theirs, mine = load_file(folder / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(theirs) == set(mine)
    for key, t in theirs.items():
        assert t.dtype == mine[key].dtype and torch.equal(t, mine[key]), key
    back = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, _ = padded_batch(128)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_greedy_generation_matches_transformers_generate(saved):
    """Left-padded prompts, prompt + 12 new tokens far past the window of 4: KV cache with sinks."""
    hf, folder = saved
    ours = moetune.load_model(folder)
    prompts = [[5, 17, 99, 3, 42, 8, 61], [7, 1, 2]]
    got = generate(ours, prompts, eos_id=None, config=SamplingConfig(max_new_tokens=12))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    print(f"gpt_oss greedy: {got}")
    assert got == ref[:, width:].tolist()


def test_sliding_layers_cache_only_their_window(saved):
    """Prefill 7 tokens then decode one at a time: each step equals the full forward, and the sliding
    layers (0 and 2, window 4) hold 3 positions while the full layer holds all of them."""
    _, folder = saved
    ours = moetune.load_model(folder)
    ids, mask = padded_batch(128)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        cache = KVCache()
        steps = [ours(ids[:, :7], attention_mask=mask[:, :7], cache=cache).logits]
        for t in range(7, ids.shape[1]):
            steps.append(ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    real = mask.bool()
    assert (torch.cat(steps, dim=1) - full)[real].abs().max() <= 1e-5
    assert [cache.layers[i][0].shape[2] for i in range(3)] == [3, 12, 3] and cache.length == 12


def test_parser_defaults_are_transformers_defaults():
    """A config.json that leaves keys out reads as transformers' GptOssConfig defaults."""
    full = transformers.GptOssConfig().to_dict()
    a, b = model_args_from_hf({"model_type": "gpt_oss"}), model_args_from_hf(full)
    a.hf_config = b.hf_config = {}
    assert a == b
    assert b.sliding_window[:4] == [128, None, 128, None] and b.qkv_bias and b.o_bias
    assert (b.rope.kind, b.rope.factor, b.rope.truncate, b.rope.theta) == ("yarn", 32.0, False, 150000.0)
    assert (b.moe.num_experts, b.moe.top_k, b.head_dim, b.num_kv_heads) == (128, 4, 64, 8)


# gpt-oss-20b's config.json as released (legacy rope_scaling, swiglu_limit; its MXFP4 quantization_config left out)
RELEASED_20B = dict(
    model_type="gpt_oss",
    attention_bias=True,
    experts_per_token=4,
    head_dim=64,
    hidden_act="silu",
    hidden_size=2880,
    initial_context_length=4096,
    intermediate_size=2880,
    layer_types=["sliding_attention", "full_attention"] * 12,
    max_position_embeddings=131072,
    num_attention_heads=64,
    num_experts_per_tok=4,
    num_hidden_layers=24,
    num_key_value_heads=8,
    num_local_experts=32,
    rms_norm_eps=1e-05,
    rope_scaling=dict(
        beta_fast=32.0,
        beta_slow=1.0,
        factor=32.0,
        original_max_position_embeddings=4096,
        rope_type="yarn",
        truncate=False,
    ),
    rope_theta=150000,
    router_aux_loss_coef=0.9,
    sliding_window=128,
    swiglu_limit=7.0,
    tie_word_embeddings=False,
    vocab_size=201088,
)


def test_released_20b_config_and_its_long_context_rope():
    """The released config reads as transformers reads it, and the YaRN tables (factor 32, no
    truncation) equal transformers' rotary embedding out to 131072 positions."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from moetune.model.layers import RotaryEmbedding

    config = transformers.GptOssConfig(**RELEASED_20B)
    a, b = model_args_from_hf(dict(RELEASED_20B)), model_args_from_hf(config.to_dict())
    a.hf_config = b.hf_config = {}
    assert a == b and a.moe.num_experts == 32 and a.moe.router_aux_loss_coef == 0.9
    pos = torch.tensor([[0, 1, 127, 128, 4095, 4096, 65536, 131071]])
    ref_cos, ref_sin = GptOssRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos)
    ours = RotaryEmbedding(rope=a.rope, head_dim=a.head_dim, max_position_embeddings=a.max_position_embeddings)
    cos, sin = ours(pos, torch.float32)
    half = cos.shape[-1] // 2  # transformers' gpt-oss tables hold each frequency once
    assert torch.equal(cos[..., :half], ref_cos) and torch.equal(sin[..., :half], ref_sin)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"swiglu_limit": 10.0}, "swiglu_limit=10.0 is not supported"),
        ({"layer_types": ["sliding_attention"]}, "layer_types=.* is not supported \\(3 entries"),
    ],
)
def test_unsupported_configs_are_refused(saved, tmp_path, change, message):
    _, folder = saved
    cfg = {**json.loads((folder / "config.json").read_text()), **change}
    with pytest.raises(CheckpointError, match=message):
        model_args_from_hf(cfg)


def test_inspect_reports_the_family(saved):
    _, folder = saved
    report = inspect_model(folder)
    print(report)
    assert "family            gpt_oss" in report
    assert "experts           8 routed, top-2" in report
    assert "attention         sliding window 4 on 2 of 3 layers, learned sinks" in report
    assert "q_proj" in report and "experts" in report


def test_unknown_tensor_is_an_error_naming_it(saved, tmp_path):
    from safetensors.torch import save_file

    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(2)
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors")
    (tmp_path / "bad" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.experts.gate_up_proj_blocks' is not part"):
        moetune.load_model(tmp_path / "bad")


def test_nf4_is_refused_not_ignored_on_the_biased_experts(saved):
    _, folder = saved
    with pytest.raises(CheckpointError, match="quantize='nf4' does not support the experts of 'model.layers.0.mlp"):
        moetune.load_model(folder, quantize="nf4")
