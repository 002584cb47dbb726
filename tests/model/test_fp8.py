"""Block-scaled FP8 checkpoints read as released: dequantization bit for bit against transformers,
logits against transformers, LoRA gradients through the compact base, bytes held."""

import copy
import json

import pytest
import torch
import transformers
from quant_fixtures import (
    fp8_dequantize_reference,
    fp8_quantize,
    write_dequantized_folder,
    write_fp8_folder,
)
from tiny_deepseek import make_hf
from tiny_hf import save_hf_model

import moetune
from moetune.inspect import inspect_model
from moetune.errors import CheckpointError
from moetune.model.quant import (
    FP8Weight,
    QuantGroupedExperts,
    QuantLinear,
    dequantize_model,
    quantized_bytes,
    quantized_weights,
)
from moetune.model.quant.fp8 import dequantize_fp8, quantize_fp8

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]


@pytest.fixture(scope="module")
def qwen_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_moe_fp8")
    save_hf_model("qwen3_moe", root / "full")
    gates = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    write_fp8_folder(root / "full", root / "fp8", block=(16, 16), not_converted=["lm_head", *gates])
    return root / "fp8"


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory):
    """DeepSeek-V3 (compressed q, groups, correction bias, shared and dense layers) in FP8 with
    partial blocks, as the release has them (q_a_proj / kv_a_proj_with_mqa have 24 rows)."""
    root = tmp_path_factory.mktemp("deepseek_fp8")
    make_hf("v3_groups_yarn").save_pretrained(root / "full")
    write_fp8_folder(root / "full", root / "fp8", block=(16, 16))
    write_dequantized_folder(root / "fp8", root / "dequantized")
    return root


def _ids(vocab=128, shape=(2, 11)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("shape", [(64, 96), (4, 32, 48), (2, 256, 160)])
@pytest.mark.parametrize("block", [(16, 16), (128, 128), (32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_transformers_bit_for_bit(shape, block, dtype):
    """Divisible shapes go through transformers' Fp8Dequantize as they are; others (partial last
    block) through it zero-padded to whole blocks, then cropped."""
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # columns of very different magnitude
    q, scale = fp8_quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape[-2:] == (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    ours = dequantize_fp8(q, scale, block, dtype)
    assert torch.equal(ours, fp8_dequantize_reference(q, scale, block, dtype))
    if shape[-2] % block[0] == 0 and shape[-1] % block[1] == 0:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        assert torch.equal(ours, Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=dtype))


@pytest.mark.parametrize("shape, block", [((64, 96), (16, 16)), ((3, 40, 72), (16, 32)), ((256, 384), (128, 128))])
def test_quantize_equals_transformers_bit_for_bit(shape, block):
    """Our FP8 quantizer (merge --requantize) against transformers' Fp8Quantize (zero-padded for the
    partial blocks of (3, 40, 72)), zero blocks and bf16 input included."""
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])
    w[..., :16, :16] = 0
    for dtype in (torch.float32, torch.bfloat16):
        q, scale = quantize_fp8(w.to(dtype), block)
        ref_q, ref_scale = fp8_quantize(w.to(dtype), block)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale)


def test_qwen3_moe_fp8_logits_match_transformers(qwen_fp8):
    """transformers reads the same FP8 folder (on CPU it dequantizes at load)."""
    ours = moetune.load_model(qwen_fp8)
    ref = transformers.AutoModelForCausalLM.from_pretrained(qwen_fp8, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        err = (ours(ids).logits - ref(ids).logits).abs().max().item()
    print(f"qwen3-moe fp8 logits max |diff| vs transformers: {err:.3g}")
    assert err <= 1e-5
    layer = ours.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(layer.mlp.experts, QuantGroupedExperts)
    assert isinstance(layer.mlp.experts.gate_up_proj, FP8Weight) and type(layer.mlp.gate.weight) is torch.nn.Parameter
    assert torch.equal(
        layer.mlp.experts.dequantized_weight("gate_up_proj"), ref.model.layers[0].mlp.experts.gate_up_proj
    )


def test_deepseek_v3_fp8_logits_match_the_dequantized_model(deepseek_fp8):
    """transformers' own CPU path cannot read partial blocks (its Fp8Dequantize asks for dims divisible
    by the scale grid), so the reference is transformers on the folder dequantized by Fp8Dequantize."""
    ours = moetune.load_model(deepseek_fp8 / "fp8")
    ref = transformers.AutoModelForCausalLM.from_pretrained(deepseek_fp8 / "dequantized", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        err = (ours(ids).logits - ref.eval()(ids).logits).abs().max().item()
    print(f"deepseek-v3 fp8 logits max |diff| vs dequantized transformers: {err:.3g}")
    assert err <= 1e-5
    attn = ours.model.layers[1].self_attn
    assert attn.kv_a_proj_with_mqa.stored.weight_scale_inv.shape == (2, 4)  # 24 rows: one partial block
    bf16 = moetune.load_model(deepseek_fp8 / "fp8", dtype=torch.bfloat16)
    experts = bf16.model.layers[1].mlp.experts
    assert experts.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert experts.gate_up_proj.weight_scale_inv.dtype == torch.float32
    assert experts.dequantized_weight("down_proj").dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_lora_gradients_through_fp8_equal_the_dequantized_base(qwen_fp8):
    quant = moetune.load_model(qwen_fp8)
    moetune.add_adapter(quant, moetune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in quant.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    plain = dequantize_model(copy.deepcopy(quant))
    ids = _ids()
    grads = []
    for model in (quant, plain):
        model.train()
        torch.manual_seed(7)  # the same dropout masks
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    err = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    print(f"LoRA grads through fp8 vs dequantized base: max |diff| {err:.3g}")
    assert err <= 1e-6
    assert all(p.grad is None for n, p in quant.named_parameters() if "lora" not in n)


def test_held_bytes_of_an_fp8_base(qwen_fp8):
    """Stored bytes per quantized parameter (scales included), and the whole base against bf16."""
    model = moetune.load_model(qwen_fp8, dtype=torch.bfloat16)
    stored, count = quantized_bytes(model)
    assert stored / count <= 1 + 4 / 16**2 + 1e-9  # 16x16 blocks here: one fp32 scale per 256 bytes
    report = inspect_model(qwen_fp8)
    assert "quantization      fp8, " in report and "stored at 1.016 bytes each" in report, report
    held = stored + sum(p.numel() * p.element_size() for p in model.parameters())
    params = count + sum(p.numel() for p in model.parameters())
    print(f"fp8 base: {stored / count:.4f} bytes per quantized parameter; whole base {held} bytes = "
          f"{held / (2 * params):.3f} of bf16")
    kept = ("embed_tokens", "norm", "lm_head", "mlp.gate.")  # no full-precision copy of any other weight
    assert all(any(k in n for k in kept) for n, _ in model.named_parameters())
    released = FP8Weight((4, 1536, 2048), block=(128, 128))  # Qwen3-30B-A3B gate_up shape, 4 experts
    assert released.storage_bytes() / released.numel() <= 1.02


def test_fp8_base_survives_dtype_and_save(qwen_fp8, tmp_path):
    model = moetune.load_model(qwen_fp8)
    before = model(_ids()).logits
    stored = {n: b.clone() for n, b in model.named_buffers() if "weight" in n}
    model.to(torch.bfloat16)  # casts move the stored bytes and scales but never convert them
    after = dict(model.named_buffers())
    assert all(torch.equal(after[n], b) and after[n].dtype == b.dtype for n, b in stored.items())
    assert model.model.layers[0].self_attn.o_proj.dequantized_weight().dtype == torch.bfloat16
    model = moetune.load_model(qwen_fp8)
    model.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg  # written dequantized
    assert torch.equal(moetune.load_model(tmp_path / "out")(_ids()).logits, before)


@pytest.mark.parametrize(
    "quant, match",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not a format moetune reads.*supported: fp8"),
        ({"quant_method": "awq"}, "'awq' is not a format"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not a format"),
        ({"quant_method": "mystery"}, "'mystery' is not a format"),
        ({"quant_method": "fp8", "weight_block_size": [16, 16], "activation_scheme": "static"}, "activation_scheme"),
        ({"quant_method": "fp8", "weight_block_size": None}, "weight_block_size is None"),
    ],
)
def test_unsupported_quantization_configs_are_refused(qwen_fp8, tmp_path, quant, match):
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes((qwen_fp8 / name).read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = quant
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        moetune.load_model(tmp_path)


def test_nf4_from_an_fp8_folder_equals_nf4_from_the_dequantized_folder(deepseek_fp8, caplog):
    """quantize='nf4' on an FP8 release: dequantized, then NF4, with a warning; the same NF4 model as
    quantize='nf4' on the folder transformers' Fp8Dequantize writes."""
    with caplog.at_level("WARNING", logger="moetune"):
        nf4 = moetune.load_model(deepseek_fp8 / "fp8", quantize="nf4")
    assert "dequantized from fp8 and quantized again to nf4" in caplog.text
    assert {type(h).__name__ for h in quantized_weights(nf4).values()} == {"NF4Weight"}
    ref = moetune.load_model(deepseek_fp8 / "dequantized", quantize="nf4")
    assert quantized_weights(nf4).keys() == quantized_weights(ref).keys()
    with torch.no_grad():
        assert torch.equal(nf4(_ids()).logits, ref(_ids()).logits)


def test_fp8_config_on_a_full_precision_folder_is_refused(tmp_path):
    save_hf_model("qwen3_moe", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no checkpoint tensor has a '_scale_inv'"):
        moetune.load_model(tmp_path)
