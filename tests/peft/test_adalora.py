"""AdaLoRA: forward and rank allocation vs the real ``peft`` package, budget, exports, config."""

from __future__ import annotations

import json

import pytest
import torch

import moetune
from moetune.config import AdaLoraOptions
from moetune.errors import AdapterError, ConfigError
from moetune.peft.adalora.adapters import svd_layers
from moetune.peft.adalora.allocator import allocators, orth_regularization, rank_pattern, update_and_allocate
from moetune.peft.formats.adalora import save_adalora
from moetune.peft.core.params import trainable_parameters
from tiny_hf import save_hf_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _ids(seed=3, vocab=128):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _ada(r=4, target_r=2, total=10, **kw):
    return AdaLoraOptions(target_r=target_r, total_step=total, **kw)


def _peft_model(hf, targets, r=4, target_r=2, total=10, **kw):
    cfg = peft.AdaLoraConfig(
        init_r=r, target_r=target_r, lora_alpha=8, target_modules=targets, total_step=total, task_type="CAUSAL_LM", **kw
    )  # CAUSAL_LM: PEFT adds the orth term to the loss
    return peft.get_peft_model(hf, cfg)


def _copy_to_peft(ours, pm):
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for key, p in trainable_parameters(ours).items():
            path, kind, name = key.rsplit(".", 2)
            theirs[f"base_model.model.{path}.{kind}.{name}"].copy_(p)


def _randomise(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _random_masks(model, name="default", seed=1):
    """Prune a random subset of triplets (some matrices entirely), as an allocation would."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in svd_layers(model, name):
        for local, (_, e, _) in layer.svd_triplets(name).items():
            keep = torch.rand(e.shape[:-1], generator=g) < 0.5
            layer.rank_mask.put(local, keep, persistent=False)
            with torch.no_grad():
                e.masked_fill_(~keep.unsqueeze(-1), 0.0)


@pytest.mark.parametrize("case,targets", [("llama", ATTN + ["gate_proj", "up_proj", "down_proj"]), ("qwen3_moe", ATTN)])
def test_forward_matches_peft(case, targets, tmp_path):
    hf = save_hf_model(case, tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(ours, moetune.LoraConfig(r=4, alpha=8, target_modules=targets, adalora=_ada()))
    _randomise(ours)
    pm = _peft_model(hf, targets)
    _copy_to_peft(ours, pm)
    ids = _ids()
    with torch.no_grad():
        logits = ours(ids).logits
        diff = (logits - pm(ids).logits).abs().max().item()
    print(f"AdaLoRA vs PEFT ({case}): max |logits diff| {diff:.2e} (logits up to {logits.abs().max():.2f})")
    assert diff < 1e-4


def test_allocation_and_orth_loss_match_peft_step_by_step(tmp_path):
    """Same weights, data and SGD steps: the loss (CE + orth term) and every rank pattern agree,
    and after total_step - tfinal the kept rank is exactly target_r per adapted matrix."""
    targets, total = ["q_proj", "v_proj", "down_proj"], 12
    sched = dict(tinit=2, tfinal=3)
    hf = save_hf_model("llama", tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(
        ours, moetune.LoraConfig(r=4, alpha=8, target_modules=targets, adalora=_ada(total=total, delta_t=2, **sched))
    )
    pm = _peft_model(hf, targets, total=total, deltaT=2, **sched)
    theirs = dict(pm.named_parameters())
    mine = trainable_parameters(ours)
    with torch.no_grad():  # PEFT's random init -> ours
        for key, p in mine.items():
            path, kind, name = key.rsplit(".", 2)
            p.copy_(theirs[f"base_model.model.{path}.{kind}.{name}"])
    opt_o = torch.optim.SGD(list(mine.values()), lr=0.5)
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    kept = []
    for step in range(1, total + 1):
        ids = _ids(seed=step)
        loss_o = ours(ids, labels=ids).loss + orth_regularization(ours)
        loss_p = pm(ids, labels=ids).loss
        assert abs(loss_o.item() - loss_p.item()) < 1e-4, step
        loss_o.backward(), loss_p.backward()
        opt_o.step(), opt_p.step()
        update_and_allocate(ours, step)
        pm.base_model.update_and_allocate(step)
        opt_o.zero_grad(), opt_p.zero_grad()
        kept.append(allocators(ours)["default"].kept())
    ours_pattern = rank_pattern(ours, "default")
    theirs_pattern = pm.peft_config["default"].rank_pattern
    assert {k.removesuffix(".lora_E.default"): v for k, v in theirs_pattern.items()} == ours_pattern
    budget = 2 * 6  # target_r x (3 targets x 2 layers)
    print(f"AdaLoRA kept rank per step: {kept} (budget {budget}, start {4 * 6})")
    assert kept[0] == 24 and kept[total - 3 - 1 :] == [budget] * 4
    pm.save_pretrained(tmp_path / "peft_adalora")  # PEFT's own AdaLoRA folder loads as its plain-LoRA equivalent
    fresh = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(fresh, tmp_path / "peft_adalora")
    pm.eval()
    with torch.no_grad():
        assert (fresh(_ids()).logits - pm(_ids()).logits).abs().max() < 1e-4


def test_budget_over_linears_and_experts(tmp_path):
    """Experts' triplets join the same pool: each (expert, 3D parameter) is one matrix."""
    save_hf_model("qwen3_moe", tmp_path / "base")
    model = moetune.load_model(tmp_path / "base")
    ada = _ada(target_r=2, total=6, tinit=1, tfinal=2)
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "experts"], adalora=ada))
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    for step in range(1, 7):
        ids = _ids(seed=step)
        (model(ids, labels=ids).loss + orth_regularization(model)).backward()
        opt.step()
        budgets = update_and_allocate(model, step)
        opt.zero_grad()
    alloc = allocators(model)["default"]
    matrices = 2 * 1 + 2 * 8 * 2  # q_proj per layer + 8 experts x (gate_up, down) per layer
    assert alloc.matrices == matrices and alloc.init_budget == 4 * matrices
    assert budgets["default"] == alloc.kept() == 2 * matrices
    pattern = rank_pattern(model, "default")
    assert len(pattern["model.layers.0.mlp.experts.gate_up"]) == 8
    experts = sum(sum(map(sum, v)) for k, v in pattern.items() if "experts" in k)
    print(
        f"AdaLoRA budget {alloc.kept()} of {alloc.init_budget}: {experts} triplets on experts, "
        f"{alloc.kept() - experts} on q_proj"
    )


def test_plain_lora_export_reproduces_adalora_logits(tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "base")
    model = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=ATTN + ["experts"], adalora=_ada()))
    _randomise(model)
    _random_masks(model)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    out = moetune.save_adapter(model, tmp_path / "plain")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"]  # per-module kept ranks
    fresh = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(fresh, out)
    with torch.no_grad():
        diff = (fresh(ids).logits - want).abs().max().item()
    print(f"AdaLoRA -> plain LoRA export: max |logits diff| {diff:.2e}")
    assert diff < 1e-5
    merged = moetune.merge_adapter(model)  # merged == unmerged, experts included
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max().item() < 1e-4


# PEFT's AdaLoRA keys rank_pattern by lora_E parameter names (its own save does the same), and
# PEFT 0.21's generic pattern check, which expects module names, warns about them; AdaLoRA's resize
# still uses them (the test checks the logits).
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_peft_adalora_layout_loads_in_peft(tmp_path):
    hf = save_hf_model("llama", tmp_path / "base")
    model = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=ATTN, adalora=_ada()))
    _randomise(model)
    _random_masks(model)
    out = save_adalora(model, tmp_path / "ada")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 4
    assert (
        cfg["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"]
        == rank_pattern(model, "default")["model.layers.0.self_attn.q_proj"]
    )
    loaded = peft.PeftModel.from_pretrained(hf, out)
    ids = _ids()
    again = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(again, out)  # and moetune reads it back
    with torch.no_grad():
        want = model(ids).logits
        assert (loaded(ids).logits - want).abs().max() < 1e-4
        assert (again(ids).logits - want).abs().max() < 1e-5


def test_stacks_on_a_plain_lora_and_rejects_bad_options(tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "base")
    model = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(model, moetune.LoraConfig(r=2, target_modules=["q_proj", "experts"]), name="old")
    _randomise(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    moetune.add_adapter(
        model, moetune.LoraConfig(r=4, target_modules=["q_proj", "experts"], adalora=_ada()), name="new"
    )
    for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.experts):  # adopted in place
        assert layer.adapter_names == ["old", "new"] and layer.is_svd("new") and not layer.is_svd("old")
    moetune.set_adapter(model, ["old", "new"])
    with torch.no_grad():  # Lambda starts at 0: the new adapter adds nothing yet
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(AdapterError, match="routed-expert"):
        save_adalora(model, tmp_path / "e", name="new")
    with pytest.raises(ConfigError, match="use_dora"):
        moetune.LoraConfig(r=4, use_dora=True, adalora=_ada())
    with pytest.raises(ConfigError, match="target_r"):
        moetune.LoraConfig(r=4, adalora=_ada(target_r=6))
    with pytest.raises(ConfigError, match="tinit"):
        AdaLoraOptions(total_step=10, tinit=6, tfinal=4)
