"""``moetune merge`` on a base released quantized: the adapter is folded into the dequantized base,
which is written as a plain (full-precision) checkpoint."""

import json

import torch
from quant_fixtures import nonzero_lora_b, write_fp8_folder
from tiny_hf import save_hf_model

import moetune
from moetune.model.quant import FP8Weight, QuantLinear
from moetune.workflows import merge_to_checkpoint


def _saved_adapter(base, targets: list[str], out):
    """A LoRA with non-zero B on the quantized base folder ``base``, saved at ``out``; the model carrying it."""
    model = moetune.load_model(base)
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=targets))
    nonzero_lora_b(model)
    moetune.save_adapter(model, out)
    return model


def test_merge_on_an_fp8_base_writes_the_dequantized_merged_model(tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "full")
    write_fp8_folder(tmp_path / "full", tmp_path / "fp8", block=(16, 16))
    model = _saved_adapter(tmp_path / "fp8", ["q_proj", "o_proj", "experts"], tmp_path / "adapter")
    merge_to_checkpoint(tmp_path / "fp8", str(tmp_path / "adapter"), tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = moetune.load_model(tmp_path / "merged")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (merged(ids).logits - model.eval()(ids).logits).abs().max().item()
    print(f"merged from an fp8 base vs fp8 base + adapter: max |dlogits| {err:.2e}")
    assert err <= 1e-5


def test_merge_requantize_writes_the_fp8_format_back(tmp_path, caplog):
    """--requantize: the merged weights in block-scaled FP8 again (transformers' quantization arithmetic,
    compared bit for bit), quantization_config kept, the largest error reported."""
    from quant_fixtures import fp8_quantize

    from moetune.cli import main

    save_hf_model("qwen3_moe", tmp_path / "full")
    write_fp8_folder(tmp_path / "full", tmp_path / "fp8", block=(16, 16))
    _saved_adapter(tmp_path / "fp8", ["q_proj", "experts"], tmp_path / "adapter")
    merge_to_checkpoint(tmp_path / "fp8", str(tmp_path / "adapter"), tmp_path / "plain")
    with caplog.at_level("WARNING"):
        argv = ["merge", "--model", str(tmp_path / "fp8"), "--adapter", str(tmp_path / "adapter")]
        assert main([*argv, "--out", str(tmp_path / "requantized"), "--requantize"]) in (0, None)
    assert "max |requantized - merged|" in caplog.text
    cfg = json.loads((tmp_path / "requantized" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "requantized" / "model.safetensors"))
    merged = load_file(str(tmp_path / "plain" / "model.safetensors"))
    key = "model.layers.0.mlp.experts.3.up_proj.weight"
    q, s = fp8_quantize(merged[key], (16, 16))
    assert torch.equal(written[key].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(written[key + "_scale_inv"], s)
    from moetune.model.quant.fp8 import dequantize_fp8

    reported = float(caplog.text.split("max |requantized - merged| ")[1].split()[0])
    errors = [
        (dequantize_fp8(written[k], written[k + "_scale_inv"], (16, 16), torch.float32) - merged[k]).abs().max()
        for k in merged
        if k + "_scale_inv" in written
    ]
    print(f"requantized merge: {len(errors)} fp8 tensors, max |requantized - merged| {max(errors):.3g} ({reported})")
    assert abs(max(errors).item() - reported) <= 5e-3 * reported  # reported with 3 significant digits
    back = moetune.load_model(tmp_path / "requantized")
    assert isinstance(back.model.layers[1].mlp.experts.gate_up_proj, FP8Weight)


def test_merge_requantize_writes_the_int4_format_back(tmp_path, caplog):
    """--requantize on an INT4 base: compressed-tensors' own compress of the merged weights (taken in
    the base's bf16 scale dtype), bit for bit."""
    from quant_fixtures import int4_compress, write_int4_folder
    from safetensors.torch import load_file

    save_hf_model("qwen3_moe", tmp_path / "full")
    write_int4_folder(tmp_path / "full", tmp_path / "int4", ignore=["lm_head"])
    _saved_adapter(tmp_path / "int4", ["o_proj", "experts"], tmp_path / "adapter")
    merge_to_checkpoint(tmp_path / "int4", str(tmp_path / "adapter"), tmp_path / "plain")
    with caplog.at_level("WARNING"):
        merge_to_checkpoint(tmp_path / "int4", str(tmp_path / "adapter"), tmp_path / "requantized", requantize=True)
    print(caplog.text.strip())
    assert "to int4: max |requantized - merged|" in caplog.text
    written = load_file(str(tmp_path / "requantized" / "model.safetensors"))
    merged = load_file(str(tmp_path / "plain" / "model.safetensors"))
    for key in ("model.layers.1.mlp.experts.5.down_proj", "model.layers.0.self_attn.o_proj"):
        ref = int4_compress(merged[key + ".weight"].to(torch.bfloat16))
        assert all(torch.equal(written[f"{key}.weight_{s}"], ref[f"weight_{s}"]) for s in ("packed", "scale", "shape"))
    assert isinstance(moetune.load_model(tmp_path / "requantized").model.layers[0].self_attn.o_proj, QuantLinear)
