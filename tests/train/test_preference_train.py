"""Preference tuning end to end on a tiny MoE: ``moetune train`` with the example config raises
held-out reward accuracy from chance to >= 90%; kill -9 and ``--resume`` give the uninterrupted
run's losses (with the reference table precomputed and read back); every objective trains."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from safetensors.torch import load_file

import moetune
from moetune.config import DataSection, load_train_config
from moetune.config.preference import PreferenceSection
from moetune.data import ByteTokenizer
from moetune.data.preference import build_preference_datasets, preference_batches
from moetune.demo_data import make_rows, random_word, write_jsonl
from moetune.model import build_random_model
from moetune.outputs import read_marker
from moetune.peft.core.params import trainable_parameters
from moetune.tiny_models import tiny_moe_args
from moetune.train.preference import PreferenceObjective
from moetune.train.reference import REFERENCE_FILE
from moetune.train.trainer import train
from train_helpers import losses, train_killed_after

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_qwen3_moe_dpo.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")  # one thread, as the torchrun ranks


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pref") / "base"
    build_random_model(tiny_moe_args(272, hidden_size=32), seed=0, std=0.05).save_pretrained(out)
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def _base_prefers_chosen(model_dir: Path, data: Path) -> float:
    """Fraction of pairs whose chosen completion the base gives the higher log-prob."""
    tok = ByteTokenizer()
    pairs = build_preference_datasets(DataSection(train=str(data), max_length=48), tok, kind="pairs", seed=0).train
    objective = PreferenceObjective(moetune.load_model(model_dir), "none", kind="dpo", options=PreferenceSection())
    wins = 0
    for batch in preference_batches(pairs, batch_size=32, pad_id=tok.pad_id):
        logps = objective.reference_logps(batch, train=False).view(2, -1)
        wins += int((logps[0] > logps[1]).sum())
    return wins / len(pairs)


def test_example_config_raises_heldout_reward_accuracy(base, tmp_path):
    train_file = write_jsonl(make_rows("upper_pairs", 64, 1), tmp_path / "train.jsonl")
    held_out = write_jsonl(make_rows("upper_pairs", 32, 2), tmp_path / "eval.jsonl")
    before = _base_prefers_chosen(base, held_out)
    run = tmp_path / "run"
    overrides = [f"model.path={base}", f"data.train={train_file}", f"data.eval={held_out}"]
    overrides += [f"checkpoint.output_dir={run}", "optim.max_steps=12", "logging.eval_every=12"]
    command = [sys.executable, "-m", "moetune", "train", str(EXAMPLE), *overrides, "logging.progress=false"]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [r for r in _records(run) if "eval_reward_accuracy" in r][-1]
    print(f"held-out: base prefers chosen {before:.0%}; after DPO reward accuracy {final['eval_reward_accuracy']:.0%}")
    assert 0.3 <= before <= 0.7
    assert final["eval_reward_accuracy"] >= 0.9 and final["eval_reward_margin"] > 0
    first = _records(run)[0]
    for key in ("loss", "reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin", "kl", "aux_loss"):
        assert key in first, key
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def _config(root: Path, base: Path, objective: str, steps: int, save_every: int = 0, **preference) -> Path:
    if objective == "kto":
        rng, rows = random.Random(3), []
        for i in range(32):
            word, good = random_word(rng, mixed=False), i % 2 == 1
            rows.append({"prompt": f"upper: {word}", "completion": word.upper() if good else word, "label": good})
    else:
        rows = make_rows("upper_pairs", 32, 3)
    cfg = {
        "model": {"path": str(base), "device": "cpu"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "experts"]},
        "data": {"train": str(write_jsonl(rows, root / "train.jsonl")), "max_length": 32, "tokenizer": "byte"},
        "optim": {"lr": 1e-2, "max_steps": steps, "batch_size": 4, "grad_accum": 2, "objective": objective},
        "checkpoint": {"output_dir": str(root / "run"), "save_every": save_every, "keep_last": 3},
        "logging": {"progress": False},
    }
    if preference:
        cfg["optim"]["preference"] = preference
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_after_kill_gives_the_same_losses(base, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed run's process computes as this one does
    straight = _config(tmp_path / "a", base, "dpo", 4, 1, precompute_reference=True)
    train(load_train_config(straight))
    killed = _config(tmp_path / "b", base, "dpo", 4, 1, precompute_reference=True)
    proc = train_killed_after(killed, 2)
    assert proc.returncode == -9, proc.stderr[-2000:]
    table = tmp_path / "b" / "run" / REFERENCE_FILE
    assert table.exists() and REFERENCE_FILE in read_marker(tmp_path / "b" / "run").files
    written = table.stat().st_mtime_ns
    train(load_train_config(killed), resume=True)
    assert table.stat().st_mtime_ns == written  # read back, not computed again
    a, b = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert len(a) == 4 and a == b


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo", "kto"])
def test_each_objective_trains(base, tmp_path, objective):
    result = train(load_train_config(_config(tmp_path, base, objective, 2)))
    records = _records(tmp_path / "run")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "reward_chosen" in records[-1] and "reward_margin" in records[-1]
    assert ("kl" in records[-1]) == (objective in ("ipo", "kto"))


def _torchrun(cfg: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that dies prints every thread's Python stack into the failure
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moetune"]
    proc = subprocess.run([*cmd, "train", str(cfg), *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_fsdp_two_ranks_equal_one_process(base, tmp_path):
    """DPO under torchrun (FSDP2, 2 ranks x 2 pairs) == one process with 4 pairs: losses, rewards,
    eval on 9 pairs (uneven over the ranks: rank 1 runs a filler forward), reference precomputed."""
    runs = {}
    for name, batch, args in (("one", 4, ()), ("fsdp", 2, ("distributed.strategy=fsdp",))):
        cfg = _config(tmp_path / name, base, "dpo", 3, precompute_reference=True)
        raw = yaml.safe_load(cfg.read_text())
        raw["optim"]["batch_size"], raw["logging"]["eval_every"] = batch, 3
        raw["data"]["eval"] = str(write_jsonl(make_rows("upper_pairs", 9, 4), tmp_path / "eval9.jsonl"))
        raw["adapter"]["dropout"] = 0.0  # each rank draws its own dropout masks
        cfg.write_text(yaml.safe_dump(raw))
        _torchrun(cfg, *args) if args else train(load_train_config(cfg))
        runs[name] = _records(tmp_path / name / "run")
    for key in ("loss", "aux_loss", "reward_margin", "kl", "eval_loss", "eval_reward_margin"):
        a = [r[key] for r in runs["one"] if key in r]
        b = [r[key] for r in runs["fsdp"] if key in r]
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (key, a, b)


@pytest.mark.parametrize(
    "adapter, model",
    [
        ({"method": "dora", "target_modules": ["q_proj", "v_proj", "o_proj"]}, {}),
        ({"method": "mola", "target_modules": ["q_proj", "v_proj"]}, {}),
        ({"target_modules": ["q_proj", "v_proj", "experts"]}, {"quantize": "nf4"}),
    ],
    ids=["dora", "mola-mixture", "qlora-nf4-experts"],
)
def test_adapter_kinds_start_at_the_reference(base, tmp_path, adapter, model):
    """A new adapter changes nothing, so the first DPO loss is exactly log 2: the policy forward
    and the reference forward (adapters off) agree for DoRA, a mixture of LoRA experts and a 4-bit
    base with expert LoRA; a second step moves off it."""
    cfg = _config(tmp_path, base, "dpo", 2)
    raw = yaml.safe_load(cfg.read_text())
    raw["adapter"] = {"r": 4, "alpha": 8, **adapter}
    raw["model"].update(model)
    cfg.write_text(yaml.safe_dump(raw))
    first, second = train(load_train_config(cfg)).losses
    assert abs(first - math.log(2)) <= 1e-6 and second < first


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_equals_the_reference_forward(base, tmp_path, objective):
    """The table gives each example the log-probs the per-step reference forward gives it (the
    lookup by example index follows the shuffled order; KTO's second column is its KL row)."""
    runs = {}
    for precompute in (False, True):
        cfg = _config(tmp_path / str(precompute), base, objective, 3, precompute_reference=precompute)
        raw = yaml.safe_load(cfg.read_text())
        raw["adapter"]["dropout"] = 0.0  # the per-step forward draws no dropout masks for the table to miss
        cfg.write_text(yaml.safe_dump(raw))
        train(load_train_config(cfg))
        runs[precompute] = _records(tmp_path / str(precompute) / "run")
    assert (tmp_path / "True" / "run" / REFERENCE_FILE).exists() and not (
        tmp_path / "False" / "run" / REFERENCE_FILE
    ).exists()
    for key in ("loss", "reward_chosen", "reward_rejected", "kl"):
        a, b = [r[key] for r in runs[False]], [r[key] for r in runs[True]]
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (key, a, b)


def test_reference_initial_scores_against_the_starting_adapter(base, tmp_path, caplog):
    """``reference: initial``: an adapter started from a folder (an SFT adapter, say) is scored
    against a frozen copy of itself as loaded, so the first loss is log 2; with the base as the
    reference it is not, and the run warns that the reference lacks the starting adapter."""
    model = moetune.load_model(base)
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn_like(p) * 0.3)
    start = moetune.save_adapter(model, tmp_path / "sft")
    first = {}
    for reference in ("initial", "base"):
        cfg = _config(tmp_path / reference, base, "dpo", 2, 1, precompute_reference=True, reference=reference)
        raw = yaml.safe_load(cfg.read_text())
        raw["adapter"] = {"path": str(start), "dropout": 0.0}
        cfg.write_text(yaml.safe_dump(raw))
        first[reference] = train(load_train_config(cfg)).losses[0]
    assert abs(first["initial"] - math.log(2)) <= 1e-6 and abs(first["base"] - math.log(2)) > 1e-3
    assert "the reference is the base without it" in caplog.text
    checkpoint = tmp_path / "initial" / "run" / "checkpoints" / "checkpoint-00000002"
    assert sorted(p.name for p in checkpoint.glob("adapter-*")) == ["adapter-default.safetensors"]  # no copy saved
    assert load_file(str(checkpoint / "adapter-default.safetensors"))
