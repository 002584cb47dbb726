"""Trainer extras: AdaLoRA runs (budget, saved pattern, exports), stacking on frozen adapters,
distillation (base, adapter and file teachers)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moetune
from moetune.config import load_train_config
from moetune.errors import ConfigError
from moetune.peft.adalora_alloc import allocators
from moetune.train.objectives import distill_loss, save_teacher_logits
from moetune.train.setup import prepare_run
from moetune.train.trainer import Trainer, train
from train_helpers import losses, tiny_model_dir, write_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ids(n=2, t=12):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(5))


def _run(tmp_path, **sections):
    base = {"checkpoint": {"output_dir": str(tmp_path / "run"), "save_every": 0}, "logging": {"progress": False}}
    path = write_run(tmp_path, **{**base, **sections})
    if "adapters" in sections:  # write_run's default single adapter makes way for the list
        raw = yaml.safe_load(path.read_text())
        raw.pop("adapter")
        path.write_text(yaml.safe_dump(raw))
    return load_train_config(path)


def test_adalora_run_keeps_the_budget_and_saves_equivalent_files(tmp_path):
    adapter = {"method": "adalora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "experts"],
               "adalora": {"target_r": 2, "tinit": 1, "tfinal": 2, "orth_reg_weight": 0.1}}
    config = _run(tmp_path, adapter=adapter, optim={"lr": 3e-3, "max_steps": 6, "batch_size": 4})
    assert config.adapters[0].adalora.total_step == 6  # from optim.max_steps
    parts = prepare_run(config)
    result = Trainer(config, parts).run()
    model = parts.model
    alloc = allocators(model)["default"]
    assert alloc.kept() == 2 * alloc.matrices  # target_r x adapted matrices (2 x (2 + 2 + 2 x 8 x 2))
    folder = result.adapter_dirs["default"]
    pattern = json.loads((folder / "rank_pattern.json").read_text())
    assert sum(sum(map(sum, v)) if isinstance(v[0], list) else sum(v) for v in pattern.values()) == alloc.kept()
    assert not (folder / "adalora").exists()  # experts: PEFT's AdaLoRA layout cannot hold them
    ids = _ids()
    model.eval()
    fresh = moetune.load_model(config.model.path)
    moetune.load_adapter(fresh, folder)  # the plain-LoRA export
    with torch.no_grad():
        assert (fresh(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_stacked_adapter_trains_on_top_of_a_frozen_one(tmp_path):
    first = train(_run(tmp_path / "a", optim={"lr": 3e-3, "max_steps": 3, "batch_size": 8}))
    old = first.adapter_dirs["default"]
    adapters = [{"name": "old", "path": str(old), "frozen": True},
                {"name": "new", "r": 4, "alpha": 8, "target_modules": ["q_proj", "o_proj"]}]
    raw = {"adapters": adapters, "optim": {"lr": 3e-3, "max_steps": 3, "batch_size": 8}}
    config = _run(tmp_path / "b", **raw)
    parts = prepare_run(config)
    model = parts.model
    before = {k: v.clone() for k, v in moetune.trainable_parameters(model, "old").items()}
    assert not any(p.requires_grad for p in moetune.trainable_parameters(model, "old").values())
    result = Trainer(config, parts).run()
    after = moetune.trainable_parameters(model, "old")
    assert all(torch.equal(before[k], after[k]) for k in before)  # never trained
    saved = load_file(str(result.adapter_dirs["new"] / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # the new one did train
    ids = _ids()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits  # both adapters active, as in training
        fresh = moetune.load_model(config.model.path)
        moetune.load_adapter(fresh, old, name="old")
        moetune.load_adapter(fresh, result.adapter_dirs["new"], name="new")
        moetune.set_adapter(fresh, ["old", "new"])
        assert (fresh(ids).logits - want).abs().max() < 1e-5
        moetune.set_adapter(fresh, ["new"])
        assert (fresh(ids).logits - want).abs().max() > 1e-4  # the frozen adapter matters


def test_frozen_needs_a_path_and_a_teacher_adapter_must_be_frozen(tmp_path):
    with pytest.raises(ConfigError, match="frozen"):
        _run(tmp_path, adapter={"frozen": True})
    with pytest.raises(ConfigError, match="not a frozen adapter"):
        _run(tmp_path, optim={"max_steps": 2, "batch_size": 2, "distill": {"teacher": "adapter:default"}})
    with pytest.raises(ConfigError, match="teacher"):
        _run(tmp_path, optim={"max_steps": 2, "batch_size": 2, "distill": {"teacher": "teacher"}})


def test_distill_loss_is_the_tempered_kl_on_counted_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    labels = torch.tensor([[-100, -100, 3, 1]])  # positions 1 and 2 predict a label
    T = 2.0
    p, logq = F.softmax(t[0, 1:3] / T, -1), F.log_softmax(s[0, 1:3] / T, -1)
    want = (p * (p.log() - logq)).sum(-1).mean() * T * T
    assert torch.allclose(distill_loss(s, t, labels, T), want, atol=1e-6)
    assert distill_loss(t, t, labels, T).abs() < 1e-6


@pytest.mark.parametrize("teacher", ["base", "adapter", "file"])
def test_distillation_teachers(tmp_path, teacher):
    """At init the new adapter is a no-op (B = 0), so the student equals the base: the KL towards
    the base (live or from a file) is 0, towards a trained adapter it is not; training runs."""
    optim = {"lr": 3e-3, "max_steps": 2, "batch_size": 4}
    adapters = [{"name": "student", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}]
    if teacher == "adapter":
        first = train(_run(tmp_path / "t", optim={"lr": 1e-2, "max_steps": 3, "batch_size": 8}))
        adapters.insert(0, {"name": "teach", "path": str(first.adapter_dirs["default"]), "frozen": True})
        spec = "adapter:teach"
    else:
        spec = f"file:{tmp_path / 'teacher.safetensors'}" if teacher == "file" else "base"
    optim["distill"] = {"teacher": spec, "weight": 1.0, "temperature": 2.0}
    config = _run(tmp_path, adapters=adapters, optim=optim)
    parts = prepare_run(config)
    if teacher == "file":  # the base's logits on every training example, as a saved teacher
        base = moetune.load_model(tiny_model_dir(tmp_path))
        save_teacher_logits(base, [e.input_ids for e in parts.data.train], tmp_path / "teacher.safetensors", dtype=torch.float32)
    trainer = Trainer(config, parts)
    batch, _ = next(trainer.loader.iter_from(trainer.data_state))
    out = parts.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")}, return_logits=True)
    kl = trainer.objectives.loss(parts.model, batch, out)
    if teacher == "adapter":
        assert kl > 1e-3 and parts.model.model.layers[0].self_attn.q_proj.active == ["student"]
    else:
        assert kl.abs() < 1e-5
    result = trainer.run()
    assert result.steps == 2 and all(math.isfinite(x) for x in losses(result.output_dir))
