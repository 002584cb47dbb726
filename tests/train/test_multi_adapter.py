"""Several adapters trained at once: equal to each trained alone, own data/steps/lr, resume.

Rounding: a mixed batch is padded to its widest row, so a row's computation runs at another width
than alone, which changes float rounding (~1e-7). Adam's first updates are about ``lr * sign(g)``,
so an element whose gradient is ~0 can flip by up to ~2*lr on that noise. With rows of one length
(no width change) the runs agree to ~1e-7; with mixed lengths the losses still agree to 1e-5 and
the weights to 1e-4 (a handful of near-zero-gradient elements).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moetune.config import load_train_config
from moetune.demo_data import make_rows, write_jsonl
from moetune.train.trainer import train
from train_helpers import tiny_model_dir

ADAPTERS = {
    "a": {"name": "a", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "experts"]},
    "b": {
        "name": "b",
        "method": "dora",
        "r": 2,
        "alpha": 4,
        "target_modules": ["k_proj", "o_proj"],
        "optim": {"lr": 2e-3, "max_steps": 4, "lr_schedule": "linear", "batch_size": 4},
        "data": {"train": "lower.jsonl"},
    },
    "c": {
        "name": "c",
        "method": "mola",
        "r": 2,
        "target_modules": ["q_proj", "o_proj"],
        "mixture": {"num_experts": 3, "top_k": 2, "router_aux_loss_coef": 0.05},
    },
}


def _rows(n: int, seed: int, fixed: bool) -> list[dict]:
    rows = make_rows("upper", n, seed)
    if fixed:  # every example the same number of tokens
        rows = [
            {
                "instruction": f"upper: {r['instruction'][7:10].ljust(5, 'q')}",
                "output": r["instruction"][7:10].ljust(5, "q").upper(),
            }
            for r in rows
        ]
    return rows


def _run(root: Path, names: list[str], fixed: bool = True, **sections) -> Path:
    model = tiny_model_dir(root.parent)
    write_jsonl(_rows(64, 1, fixed), root / "upper.jsonl")
    write_jsonl(
        [
            {"instruction": r["instruction"].replace("upper", "lower"), "output": r["output"].lower()}
            for r in _rows(40, 5, fixed)
        ],
        root / "lower.jsonl",
    )
    cfg = {
        "model": {"path": str(model), "device": "cpu"},
        "adapters": [dict(ADAPTERS[n], dropout=0.0) for n in names],
        "data": {"train": "upper.jsonl", "max_length": 40},
        "optim": {"lr": 3e-3, "max_steps": 6, "batch_size": 6, "warmup_steps": 1, "aux_loss_coef": 0.01},
        "checkpoint": {"output_dir": "run", "save_every": 3, "keep_last": 3},
        "logging": {"progress": False},
        **sections,
    }
    path = root / "run.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]


def _losses(run: Path, name: str, together: bool) -> list[float]:
    recs = [r for r in _records(run) if "loss" in r]
    if not together:
        return [r["loss"] for r in recs]
    return [r["adapters"][name]["loss"] for r in recs if name in r.get("adapters", {})]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("fixed", [True, False], ids=["one-length", "mixed-lengths"])
def test_adapters_trained_together_equal_each_alone(tmp_path, fixed):
    together = _run(tmp_path / "all", ["a", "b", "c"], fixed)
    result = train(load_train_config(together))
    run = tmp_path / "all" / "run"
    assert set(result.adapter_dirs) == {"a", "b", "c"} and result.steps == 6
    records = _records(run)
    assert [sorted(r["adapters"]) for r in records if "adapters" in r][-1] == ["a", "c"]  # b stopped after 4 steps
    assert "mixture" in records[0]["adapters"]["c"] and len(records[0]["adapters"]["c"]["mixture"]["layers"]) == 4
    for name in "abc":
        alone = _run(tmp_path / name, [name], fixed)
        train(load_train_config(alone))
        a, t = _losses(tmp_path / name / "run", name, False), _losses(run, name, True)
        assert len(a) == len(t) == (4 if name == "b" else 6)
        assert max(abs(x - y) for x, y in zip(a, t)) < 1e-5, (name, a, t)
        wa, wt = _weights(tmp_path / name / "run" / "adapter"), _weights(result.adapter_dirs[name])
        assert wa.keys() == wt.keys()
        # Rows of other adapters share the LM head's matmuls together, not alone: rounding that Adam
        # amplifies where a gradient is near zero. Measured on adapter a after 6 steps at lr 3e-3:
        # 2.8e-6 to 1.4e-5 with one length, 1.5e-5 to 4.5e-5 with mixed lengths (losses within 1e-6).
        for k in wa:
            torch.testing.assert_close(wa[k], wt[k], atol=3e-5 if fixed else 1e-4, rtol=1e-5)


def test_together_resume_and_output_dirs(tmp_path):
    cfg = _run(tmp_path / "x", ["a", "b"])
    result = train(load_train_config(cfg, ["adapters.0.output_dir=" + str(tmp_path / "out-a")]))
    assert result.adapter_dirs["a"] == tmp_path / "out-a" and (tmp_path / "out-a" / "adapter_config.json").exists()
    straight = _weights(tmp_path / "out-a")
    run = tmp_path / "x" / "run"
    resumed = train(
        load_train_config(cfg, ["adapters.0.output_dir=" + str(tmp_path / "out-a2")]),
        resume=str(run / "checkpoints" / "checkpoint-00000003"),
    )
    assert resumed.steps == 6
    again = _weights(tmp_path / "out-a2")
    assert all(torch.equal(straight[k], again[k]) for k in straight)
