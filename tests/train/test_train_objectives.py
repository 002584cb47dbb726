"""Trainer extras: AdaLoRA runs (budget, saved pattern, exports), stacking on frozen adapters,
distillation (base, adapter and file teachers)."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import yaml
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moetune
from moetune.config import load_train_config
from moetune.errors import ConfigError
from moetune.peft.adalora.allocator import allocators
from moetune.train.objectives import distill_loss, save_teacher_logits
from moetune.train.setup import prepare_run
from moetune.train.checkpoint import latest_checkpoint
from moetune.train.trainer import Trainer, train
from train_helpers import losses, tiny_model_dir, train_killed_after, write_run

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
    adapter = {
        "method": "adalora",
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj", "experts"],
        "adalora": {"target_r": 2, "tinit": 1, "tfinal": 2, "orth_reg_weight": 0.1},
    }
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


def _adalora_resume_run(root):
    """8 steps, a checkpoint after each; the budget shrinks at steps 3-5 (tinit 2, masks every step),
    the final allocation is at step 6 (total_step 8 - tfinal 2) and the masks are fixed after it."""
    adapter = {
        "method": "adalora",
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj", "experts"],
        "adalora": {"target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 1, "orth_reg_weight": 0.1},
    }
    return write_run(
        root, adapter=adapter, checkpoint={"output_dir": str(root / "run"), "save_every": 1, "keep_last": 8}
    )


def _adapter_files(run):
    folder = run / "adapter"
    return load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "rank_pattern.json").read_text())


def _weight_diff(a, b) -> str:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return f"{sum(k not in b or a[k].shape != b[k].shape for k in a)} of {len(a)} tensors with other shapes (ranks)"
    return f"{max((a[k] - b[k]).abs().max().item() for k in a):.2e}"


def test_adalora_resume_inside_the_shrinking_budget_is_exact(tmp_path):
    train(load_train_config(_adalora_resume_run(tmp_path / "a")))
    killed = _adalora_resume_run(tmp_path / "b")
    proc = train_killed_after(killed, 4)  # steps 3 and 4 have masked; 5 and 6 will, reading the EMAs
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "b" / "run" / "checkpoints").name == "checkpoint-00000004"
    train(load_train_config(killed), resume=True)
    la, lb = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    (wa, pa), (wb, pb) = _adapter_files(tmp_path / "a" / "run"), _adapter_files(tmp_path / "b" / "run")
    print(
        f"AdaLoRA resumed at step 4: max |dloss| {max(abs(x - y) for x, y in zip(la, lb)):.2e} "
        f"(first at step {next((i + 1 for i, (x, y) in enumerate(zip(la, lb)) if x != y), None)}), "
        f"max |dweight| {_weight_diff(wa, wb)}"
    )
    assert len(la) == 8 and la == lb
    assert pa == pb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_adalora_checkpoint_without_allocator_state_resumes_with_a_warning(tmp_path, caplog):
    """An earlier moetune's checkpoint: no allocator files. Resumed after the final allocation (step
    6), the masks come back from the zeroed Lambda entries, so no pruned triplet revives (a kept
    triplet whose Lambda never moved from 0, an expert that got no tokens, counts as pruned)."""
    train(load_train_config(_adalora_resume_run(tmp_path / "a")))
    old = _adalora_resume_run(tmp_path / "c")
    saved = tmp_path / "c" / "run" / "checkpoints" / "checkpoint-00000007"
    shutil.copytree(tmp_path / "a" / "run" / "checkpoints" / saved.name, saved)
    meta = json.loads((saved / "meta.json").read_text())
    for name in meta.pop("allocators"):
        (saved / f"allocator-{name}.safetensors").unlink()
    (saved / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="moetune"):
        train(load_train_config(old), resume=True)
    warned = [r.getMessage() for r in caplog.records if "allocator state" in r.getMessage()]
    assert len(warned) == 1 and saved.name in warned[0] and "importance EMAs restart" in warned[0]
    assert losses(tmp_path / "c" / "run") == losses(tmp_path / "a" / "run")[7:]
    pa, pc = _adapter_files(tmp_path / "a" / "run")[1], _adapter_files(tmp_path / "c" / "run")[1]
    at_7 = load_file(str(saved / "adapter-default.safetensors"))
    assert pa.keys() == pc.keys()
    for module, kept in pa.items():
        path, _, pair = module.rpartition(".")
        lam = at_7[f"{path}.lora_E_{pair}.default" if path.endswith("experts") else f"{module}.lora_E.default"]
        assert torch.equal(torch.tensor(pc[module]), torch.tensor(kept) & (lam.squeeze(-1) != 0)), module


def test_stacked_adapter_trains_on_top_of_a_frozen_one(tmp_path):
    first = train(_run(tmp_path / "a", optim={"lr": 3e-3, "max_steps": 3, "batch_size": 8}))
    old = first.adapter_dirs["default"]
    adapters = [
        {"name": "old", "path": str(old), "frozen": True},
        {"name": "new", "r": 4, "alpha": 8, "target_modules": ["q_proj", "o_proj"]},
    ]
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
        save_teacher_logits(
            base, [e.input_ids for e in parts.data.train], tmp_path / "teacher.safetensors", dtype=torch.float32
        )
    trainer = Trainer(config, parts)
    job = trainer.jobs[0]
    batch, _ = next(job.loader.iter_from(job.state))
    out = parts.model(
        **{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")}, return_logits=True
    )
    kl = trainer.objectives.loss(parts.model, batch, out)
    if teacher == "adapter":
        assert kl > 1e-3 and parts.model.model.layers[0].self_attn.q_proj.active == ["student"]
    else:
        assert kl.abs() < 1e-5
    result = trainer.run()
    assert result.steps == 2 and all(math.isfinite(x) for x in losses(result.output_dir))
