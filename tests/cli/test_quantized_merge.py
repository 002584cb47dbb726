"""``moetune merge`` on a base released quantized: the adapter is folded into the dequantized base,
which is written as a plain (full-precision) checkpoint."""

import json

import torch
from quant_fixtures import write_fp8_folder
from tiny_hf import save_hf_model

import moetune
from moetune.workflows import merge_to_checkpoint


def test_merge_on_an_fp8_base_writes_the_dequantized_merged_model(tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "full")
    write_fp8_folder(tmp_path / "full", tmp_path / "fp8", block=(16, 16))
    model = moetune.load_model(tmp_path / "fp8")
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj", "experts"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    moetune.save_adapter(model, tmp_path / "adapter")
    merge_to_checkpoint(tmp_path / "fp8", str(tmp_path / "adapter"), tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = moetune.load_model(tmp_path / "merged")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (merged(ids).logits - model.eval()(ids).logits).abs().max().item()
    print(f"merged from an fp8 base vs fp8 base + adapter: max |dlogits| {err:.2e}")
    assert err <= 1e-5
