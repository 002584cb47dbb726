"""INT4 checkpoints (compressed-tensors pack-quantized, symmetric groups of 32) read as released:
dequantization bit for bit against the compressed-tensors package, logits against transformers on
the decompressed folder, LoRA gradients through the compact base, bytes held."""

import json

import pytest
import torch
import transformers
from quant_fixtures import (
    KIMI_IGNORE,
    int4_compress,
    int4_decompress,
    lora_grad_gap,
    write_int4_dequantized_folder,
    write_int4_folder,
)
from tiny_deepseek import make_hf
from tiny_hf import save_hf_model

import moetune
from moetune.inspect import inspect_model
from moetune.errors import CheckpointError
from moetune.model.quant import Int4Weight, QuantGroupedExperts, QuantLinear, quantized_bytes
from moetune.model.quant.int4 import dequantize_int4, quantize_int4, unpack_int4

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def kimi_int4(tmp_path_factory):
    """DeepSeek-V3-shaped, routed experts in INT4 and the rest bf16/fp32: Kimi-K2-Thinking's layout."""
    root = tmp_path_factory.mktemp("kimi_int4")
    make_hf("v3_groups_yarn").save_pretrained(root / "full")
    write_int4_folder(root / "full", root / "int4", ignore=KIMI_IGNORE)
    write_int4_dequantized_folder(root / "int4", root / "dequantized")
    return root


@pytest.fixture(scope="module")
def qwen_int4(tmp_path_factory):
    """Qwen3-MoE with every linear but the LM head and the routers in INT4."""
    root = tmp_path_factory.mktemp("qwen_int4")
    save_hf_model("qwen3_moe", root / "full")
    write_int4_folder(root / "full", root / "int4", ignore=["lm_head"])
    return root / "int4"


def _ids(shape=(2, 11)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("shape", [(48, 64), (3, 40, 96)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_dequantize_equals_compressed_tensors_bit_for_bit(shape, scale_dtype):
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    w = (torch.randn(shape) * torch.logspace(-3, 1, shape[-1])).to(scale_dtype)
    packed = int4_compress(w)
    assert packed["weight_packed"].dtype == torch.int32 and packed["weight_scale"].dtype == scale_dtype
    p, s = packed["weight_packed"], packed["weight_scale"]
    rows = p.reshape(-1, p.shape[-1])
    ref_ints = unpack_from_int32(rows, 4, torch.Size((rows.shape[0], shape[-1])))
    assert torch.equal(unpack_int4(p, shape[-1]).reshape(-1, shape[-1]), ref_ints.int())
    reference = int4_decompress(packed)
    assert torch.equal(dequantize_int4(p, s, shape[-1], scale_dtype), reference)
    assert torch.equal(dequantize_int4(p, s, shape[-1], torch.float32), reference.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_equals_compressed_tensors_bit_for_bit(dtype):
    """Our INT4 quantizer (merge --requantize) against compressed-tensors' compress, zero groups included."""
    w = (torch.randn(3, 40, 96) * torch.logspace(-3, 1, 96)).to(dtype)
    w[..., :2, :32] = 0
    ref = int4_compress(w)
    packed, scale = quantize_int4(w, 32)
    assert torch.equal(packed, ref["weight_packed"]) and torch.equal(scale, ref["weight_scale"])


def test_kimi_shaped_int4_logits_match_the_decompressed_model(kimi_int4):
    ours = moetune.load_model(kimi_int4 / "int4")
    ref = transformers.AutoModelForCausalLM.from_pretrained(kimi_int4 / "dequantized", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        err = (ours(ids).logits - ref.eval()(ids).logits).abs().max().item()
    print(f"deepseek-v3-shaped int4 logits max |diff| vs decompressed transformers: {err:.3g}")
    assert err <= 1e-5
    experts = ours.model.layers[1].mlp.experts
    assert isinstance(experts, QuantGroupedExperts) and isinstance(experts.gate_up_proj, Int4Weight)
    assert experts.gate_up_proj.weight_scale.dtype == torch.bfloat16
    assert type(ours.model.layers[1].self_attn.kv_b_proj) is torch.nn.Linear  # ignored, as in the release
    # transformers reading the INT4 folder itself (decompressed by compressed-tensors, to bf16) holds the
    # same expert weights; its logits differ only because it keeps them bf16 next to fp32 activations
    dequantize = transformers.CompressedTensorsConfig(dequantize=True)
    same = transformers.AutoModelForCausalLM.from_pretrained(
        kimi_int4 / "int4", dtype=torch.float32, quantization_config=dequantize
    )
    for name in ("gate_up_proj", "down_proj"):
        theirs = getattr(same.model.layers[1].mlp.experts, name)
        assert torch.equal(experts.dequantized_weight(name, theirs.dtype), theirs)


def test_lora_gradients_through_int4_equal_the_dequantized_base(qwen_int4):
    quant = moetune.load_model(qwen_int4)
    assert isinstance(quant.model.layers[0].self_attn.q_proj, QuantLinear)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
    moetune.add_adapter(quant, moetune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=targets))
    err, _ = lora_grad_gap(quant, _ids())
    print(f"LoRA grads through int4 vs dequantized base: max |diff| {err:.3g}")
    assert err <= 1e-6


def test_held_bytes_of_an_int4_base(qwen_int4):
    model = moetune.load_model(qwen_int4, dtype=torch.bfloat16)
    stored, count = quantized_bytes(model)
    print(f"int4 base: {stored / count:.4f} bytes per quantized parameter (bf16 scales per 32)")
    assert stored / count == 0.5 + 2 / 32
    report = inspect_model(qwen_int4)
    assert "quantization      compressed-tensors, " in report and "stored at 0.562 bytes each" in report, report
    kept = ("embed_tokens", "norm", "lm_head", "mlp.gate.")
    assert all(any(k in n for k in kept) for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format": "int-quantized"}, "format is 'int-quantized'"),
        ({"config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                              "strategy": "group", "group_size": 32}}}}, "num_bits is 8"),
        ({"config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                              "strategy": "group", "group_size": 32}}}}, "symmetric is False"),
    ],
)
def test_unsupported_compressed_tensors_configs_are_refused(qwen_int4, tmp_path, change, match):
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes((qwen_int4 / name).read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        moetune.load_model(tmp_path)
