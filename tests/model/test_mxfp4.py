"""gpt-oss with MXFP4 experts read as released: dequantization bit for bit against transformers,
logits against transformers on the dequantized folder, LoRA gradients through the compact experts,
bytes held."""

import pytest
import torch
import transformers
from quant_fixtures import lora_grad_gap, write_mxfp4_dequantized_folder, write_mxfp4_folder
from tiny_gpt_oss import make_hf
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import moetune
from moetune.inspect import inspect_model
from moetune.model.hf import to_checkpoint
from moetune.model.quant import MXFP4Weight, QuantGroupedExperts, quantized_bytes
from moetune.model.quant.mxfp4 import dequantize_mxfp4


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    make_hf().save_pretrained(root / "full")
    write_mxfp4_folder(root / "full", root / "mxfp4")
    write_mxfp4_dequantized_folder(root / "mxfp4", root / "dequantized")
    return root


def _ids(shape=(2, 12)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_transformers_bit_for_bit(dtype):
    """Every code, and exponents over the whole e8m0 range but the NaN code (255)."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 40, 4), generator=gen, dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, dtype)  # (E, out, in)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, in, out)
    assert torch.equal(ours.transpose(1, 2), reference)


def test_gpt_oss_mxfp4_logits_match_the_dequantized_model(gpt_oss_mxfp4):
    ours = moetune.load_model(gpt_oss_mxfp4 / "mxfp4")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gpt_oss_mxfp4 / "dequantized", dtype=torch.float32, attn_implementation="eager"
    )
    ids = _ids()
    with torch.no_grad():
        err = (ours(ids).logits - ref.eval()(ids).logits).abs().max().item()
    print(f"gpt-oss mxfp4 logits max |diff| vs dequantized transformers: {err:.3g}")
    assert err <= 1e-5
    experts = ours.model.layers[0].mlp.experts
    assert isinstance(experts, QuantGroupedExperts) and isinstance(experts.down_proj, MXFP4Weight)
    assert type(experts).__name__ == "QuantGptOssExperts" and experts.gate_up_proj_bias.dtype == torch.float32
    # transformers reading the MXFP4 folder itself (dequantized on CPU, to bf16) holds the same values
    same = transformers.AutoModelForCausalLM.from_pretrained(gpt_oss_mxfp4 / "mxfp4", dtype=torch.float32)
    theirs = same.model.layers[0].mlp.experts.gate_up_proj
    mine = to_checkpoint(experts.dequantized_weight("gate_up_proj", theirs.dtype), "interleaved_transposed")
    assert torch.equal(mine, theirs)


def test_lora_gradients_through_mxfp4_experts_equal_the_dequantized_base(gpt_oss_mxfp4):
    quant = moetune.load_model(gpt_oss_mxfp4 / "mxfp4")
    moetune.add_adapter(quant, moetune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "experts"]))
    err, plain = lora_grad_gap(quant, _ids())
    assert type(plain.model.layers[0].mlp.experts.base_layer).__name__ == "GptOssExperts"
    print(f"LoRA grads through mxfp4 vs dequantized base: max |diff| {err:.3g}")
    assert err <= 1e-6


def test_held_bytes_of_mxfp4_experts_and_save(gpt_oss_mxfp4, tmp_path):
    model = moetune.load_model(gpt_oss_mxfp4 / "mxfp4", dtype=torch.bfloat16)
    stored, count = quantized_bytes(model)
    print(f"mxfp4 experts: {stored / count:.4f} bytes per parameter")
    assert stored / count == (16 + 1) / 32
    report = inspect_model(gpt_oss_mxfp4 / "mxfp4")
    assert "quantization      mxfp4, " in report and "stored at 0.531 bytes each" in report, report
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n, _ in model.named_parameters())
    model = moetune.load_model(gpt_oss_mxfp4 / "mxfp4")
    model.save_pretrained(tmp_path / "out")  # written dequantized, in gpt-oss's full-precision layout
    assert torch.equal(moetune.load_model(tmp_path / "out")(_ids()).logits, model(_ids()).logits)
