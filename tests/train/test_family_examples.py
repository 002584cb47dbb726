"""The family example configs on their tiny models (examples/gpt_oss_lora.yaml, examples/glm4_moe_lora.yaml):
transformers reads the tiny model, 20 CPU steps lower the loss, and the trained adapter loads in PEFT with the
same logits."""

import json
from pathlib import Path

import pytest
import torch

import moetune

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# family, example file, transformers class; the 40 probe tokens run past gpt-oss's window of 16
FAMILIES = [
    ("gpt_oss", "gpt_oss_lora.yaml", "GptOssForCausalLM"),
    ("glm4_moe", "glm4_moe_lora.yaml", "Glm4MoeForCausalLM"),
]


def _logits(model, ids):
    with torch.no_grad():
        return (model(ids) if isinstance(model, moetune.CausalLM) else model(input_ids=ids)).logits


@pytest.mark.parametrize("family, example, hf_class", FAMILIES)
def test_example_config_trains_the_tiny_model(tmp_path, family, example, hf_class):
    from moetune.config import load_train_config
    from moetune.tiny_models import make_tiny
    from moetune.train.trainer import train

    folder = make_tiny(family, tmp_path / "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_class
    ids = torch.randint(0, 272, (2, 40), generator=torch.Generator().manual_seed(3))
    assert (_logits(hf, ids) - _logits(moetune.load_model(folder), ids)).abs().max() <= 1e-4

    data = tmp_path / "tiny" / "data"
    config = load_train_config(
        EXAMPLES / example,
        [
            f"model.path={folder}",
            f"data.train={data / 'upper_train.jsonl'}",
            f"data.eval={data / 'upper_eval.jsonl'}",
            f"checkpoint.output_dir={tmp_path / 'run'}",
            "logging.progress=false",
        ],
    )
    result = train(config)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    print(f"tiny {family} example: loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval {result.eval_loss:.3f}")
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5

    mine = moetune.load_model(folder)
    moetune.load_adapter(mine, result.adapter_dirs["default"])
    pm = peft.PeftModel.from_pretrained(hf, str(result.adapter_dirs["default"])).eval()
    err = (_logits(pm, ids) - _logits(mine.eval(), ids)).abs().max().item()
    print(f"trained {family} adapter: moetune vs PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-4
