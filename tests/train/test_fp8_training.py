"""QLoRA-style training on a base released in FP8: the tiny DeepSeek-V3 example, with its base
written as DeepSeek's FP8 release (block-scaled e4m3, partial blocks), trained from the YAML."""

import json
from pathlib import Path

import peft
import torch
import transformers
from quant_fixtures import write_dequantized_folder, write_fp8_folder

import moetune
from moetune.config import load_train_config
from moetune.model.quant import QuantLinear
from moetune.tiny_models import make_tiny
from moetune.train.trainer import train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deepseek_v3_lora.yaml"


def test_example_trains_on_an_fp8_base_and_the_adapter_loads_in_peft(tmp_path):
    folder = make_tiny("deepseek_v3", tmp_path / "tiny")
    write_fp8_folder(folder, tmp_path / "fp8", block=(16, 16))
    write_dequantized_folder(tmp_path / "fp8", tmp_path / "dequantized")
    data = tmp_path / "tiny" / "data"
    config = load_train_config(
        EXAMPLE,
        [
            f"model.path={tmp_path / 'fp8'}",
            f"data.train={data / 'upper_train.jsonl'}",
            f"data.eval={data / 'upper_eval.jsonl'}",
            f"checkpoint.output_dir={tmp_path / 'run'}",
            "logging.progress=false",
            "optim.batch_size=4",
            "checkpoint.save_every=20",
            "logging.eval_every=20",
        ],
    )
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"tiny DeepSeek-V3 on an FP8 base: loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval {result.eval_loss:.3f}")
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5

    adapter = result.adapter_dirs["default"]
    mine = moetune.load_model(tmp_path / "fp8")
    assert isinstance(mine.get_submodule("model.layers.1.self_attn.kv_b_proj"), QuantLinear)
    moetune.load_adapter(mine, adapter)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf.eval(), str(adapter)).eval()
    ids = torch.randint(0, 272, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = (pm(input_ids=ids).logits - mine.eval()(ids).logits).abs().max().item()
    print(f"adapter trained on the FP8 base: PEFT on the dequantized model vs moetune on FP8, max |dlogits| {err:.2e}")
    assert err <= 1e-5

