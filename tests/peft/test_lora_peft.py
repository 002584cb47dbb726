"""LoRA vs the real ``peft`` package on tiny transformers models: outputs, gradients, files both ways."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetune
from moetune.peft.core.inject import adapter_configs
from moetune.peft.core.params import trainable_parameters
from tiny_hf import make_hf_model, save_hf_model

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHARED = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
# case -> (our target_modules, PEFT's target_modules for the same modules)
CASES = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],) * 2,
    "qwen3_moe": (["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],) * 2,
    "qwen2_moe": (
        ["q_proj", "v_proj", "shared_expert", "shared_expert_gate"],
        ["q_proj", "v_proj", *SHARED, "shared_expert_gate"],
    ),
}
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


def _ids(vocab=128):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))


def _randomise(model, scale=0.1):
    with torch.no_grad():
        for key, p in trainable_parameters(model).items():
            p.copy_(p * (1 + scale * torch.randn_like(p)) if "magnitude" in key else torch.randn_like(p) * scale)


def _peft_key(our_key: str) -> str:
    path, kind, name = our_key.rsplit(".", 2)  # "<path>.lora_A.default" -> PEFT's parameter name
    return f"base_model.model.{path}.{kind}.{name}.weight"


def _pair(case, tmp_path, variant="lora"):
    """Our model and PEFT's on the same base, same adapter weights (random, non-zero)."""
    ours_t, peft_t = CASES[case]
    hf = save_hf_model(case, tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base")
    opts = VARIANTS[variant]
    moetune.add_adapter(ours, moetune.LoraConfig(r=4, alpha=8, target_modules=ours_t, **opts))
    _randomise(ours)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_t, **opts))
    theirs = dict(pm.named_parameters())
    ours_params = trainable_parameters(ours)
    assert len(ours_params) == sum(1 for k in theirs if ".lora_" in k)
    with torch.no_grad():
        for key, p in ours_params.items():
            theirs[_peft_key(key)].copy_(p)
    return ours, pm


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids) if isinstance(model, moetune.CausalLM) else model(input_ids=ids)
    return out.logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_gradients_match_peft(case, variant, tmp_path):
    ours, pm = _pair(case, tmp_path, variant)
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    ours.train()
    pm.train()
    ours(ids, labels=ids).loss.backward()
    pm(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(pm.named_parameters())
    gerr = max(
        (
            (p.grad - theirs[_peft_key(k)].grad).abs().max() / theirs[_peft_key(k)].grad.abs().max().clamp_min(1e-12)
        ).item()
        for k, p in trainable_parameters(ours).items()
    )
    print(f"{case}/{variant}: max|dlogits| vs peft {err:.2e}, max relative grad diff {gerr:.2e}")
    assert err <= 1e-4
    assert gerr <= 1e-4


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_our_file_loads_in_peft(case, variant, tmp_path):
    ours, _ = _pair(case, tmp_path, variant)
    out = moetune.save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(make_hf_model(case), str(out))
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    print(f"{case}/{variant}: moetune file -> PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_in_moetune(case, variant, tmp_path):
    _, pm = _pair(case, tmp_path, variant)
    pm.save_pretrained(tmp_path / "peft")  # targets lm_head: PEFT also writes lm_head.base_layer.weight
    ours = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(ours, tmp_path / "peft")
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    print(f"{case}/{variant}: PEFT file -> moetune.load_adapter max|dlogits| {err:.2e}")
    assert err <= 1e-4


def test_peft_keys_with_adapter_names_rank_and_alpha_patterns(tmp_path):
    hf = save_hf_model("llama", tmp_path / "base")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "o_proj", "down_proj"],
        use_dora=True,
        rank_pattern={"o_proj": 2},
        alpha_pattern={"model.layers.1.mlp.down_proj": 3},
    )
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_" in k:
                p.copy_(p * 1.1 if "magnitude" in k else torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    # the same tensors under PEFT's in-memory names (adapter name inside the key) must load too
    named = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in named) and any(
        "lora_magnitude_vector.default.weight" in k for k in named
    )
    save_file({k: v.contiguous() for k, v in named.items()}, str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(ours, tmp_path / "peft")
    assert ours.get_submodule("model.layers.0.self_attn.o_proj").lora_A["default"].shape[0] == 2
    assert ours.get_submodule("model.layers.1.mlp.down_proj").scaling["default"] == 3 / 4
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    assert err <= 1e-4
    # and our re-save keeps the patterns, so PEFT reads it back identically
    out = moetune.save_adapter(ours, tmp_path / "again")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    pm2 = peft.PeftModel.from_pretrained(make_hf_model("llama"), str(out))
    assert (_logits(pm2, ids) - _logits(ours, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["layers_to_transform", "pissa"])
def test_layers_to_transform_and_pissa_files_load_in_peft(kind, tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base")
    if kind == "pissa":  # changes our base weights; the file is plain LoRA against the original ones
        config = moetune.LoraConfig(r=3, alpha=6, init="pissa", target_modules=["o_proj", "q_proj"])
    else:
        config = moetune.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], layers_to_transform=[1])
    moetune.add_adapter(ours, config)
    _randomise(ours)
    out = moetune.save_adapter(ours, tmp_path / kind)
    pm = peft.PeftModel.from_pretrained(make_hf_model("qwen3_moe"), str(out))  # the untouched base
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    print(f"{kind}: moetune file -> PEFT max|dlogits| {err:.2e}")
    assert err <= 1e-4
    assert len([k for k in load_file(str(out / "adapter_model.safetensors")) if "lora_A" in k]) == (
        3 if kind != "pissa" else 4
    )


@pytest.fixture
def experts_available():
    pytest.importorskip("moetune.peft.lora.experts")


def _experts_model(tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(ours, moetune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "experts"]))
    _randomise(ours)
    return ours


def test_experts_adapter_files_both_ways(tmp_path, experts_available):
    ours, ids = _experts_model(tmp_path), _ids()
    out = moetune.save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(make_hf_model("qwen3_moe"), str(out))
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    print(f"q_proj + experts: moetune file -> PEFT max|dlogits| {err:.2e}")
    assert err <= 1e-4
    pm.save_pretrained(tmp_path / "peft")  # PEFT's own target_parameters file, no moetune section
    assert "moetune" not in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    back = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(back, tmp_path / "peft")
    err = (_logits(back, ids) - _logits(pm, ids)).abs().max().item()
    print(f"q_proj + experts: PEFT file -> moetune max|dlogits| {err:.2e}")
    assert err <= 1e-4


def test_per_expert_layout_roundtrip(tmp_path, experts_available):
    ours, ids = _experts_model(tmp_path), _ids()
    out = moetune.save_adapter(ours, tmp_path / "vllm", layout="per_expert")
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.experts.7.gate_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.0.mlp.experts.7.down_proj.lora_B.weight"].shape == (64, 4)
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= set(
        json.loads((out / "adapter_config.json").read_text())["target_modules"]
    )
    back = moetune.load_model(tmp_path / "base")
    moetune.load_adapter(back, out)
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max() <= 1e-5


def test_peft_loads_our_folder_without_unknown_key_warnings(tmp_path, experts_available):
    """adapter_config.json is exactly PEFT's schema (moetune's metadata is in moetune_adapter.json),
    so PEFT does not warn "Unexpected keyword arguments ... upgrade the PEFT version"."""
    ours, ids = _experts_model(tmp_path), _ids()  # a linear (q_proj) and the routed experts
    out = moetune.save_adapter(ours, tmp_path / "ours")
    assert "moetune" not in json.loads((out / "adapter_config.json").read_text())
    assert json.loads((out / "moetune_adapter.json").read_text())["lora_config"]["target_modules"] == [
        "q_proj",
        "experts",
    ]
    hf = make_hf_model("qwen3_moe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, str(out))
    unknown = [str(w.message) for w in caught if "Unexpected keyword arguments" in str(w.message)]
    assert not unknown, unknown
    assert (_logits(ours, ids) - _logits(pm, ids)).abs().max() <= 1e-4


def _loaded(base, folder):
    model = moetune.load_model(base).eval()
    moetune.load_adapter(model, folder)
    return model


def test_old_folder_with_embedded_metadata_loads_identically(tmp_path, experts_available):
    """Folders of earlier moetune versions carry the metadata inside adapter_config.json under "moetune"."""
    save_hf_model("qwen3_moe", tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base").eval()
    # what only the metadata holds: one pair shared by all experts, the trained dropout next to experts
    config = moetune.LoraConfig(
        r=4, alpha=8, dropout=0.1, expert_rank="shared", target_modules=["q_proj", "experts"], layers_to_transform=[1]
    )
    moetune.add_adapter(ours, config)
    _randomise(ours)
    new = moetune.save_adapter(ours, tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    cfg = json.loads((old / "adapter_config.json").read_text())
    cfg["moetune"] = json.loads((old / "moetune_adapter.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    (old / "moetune_adapter.json").unlink()
    from_new, from_old = _loaded(tmp_path / "base", new), _loaded(tmp_path / "base", old)
    assert adapter_configs(from_old)["default"] == adapter_configs(from_new)["default"] == config
    ids = _ids()
    assert torch.equal(_logits(from_old, ids), _logits(from_new, ids))
    assert (_logits(from_new, ids) - _logits(ours, ids)).abs().max() <= 1e-6
    (new / "moetune_adapter.json").unlink()  # PEFT's config alone cannot say it: the metadata was used
    assert adapter_configs(_loaded(tmp_path / "base", new))["default"] != config


def _sidecar_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "moetune_adapter.json" in r.getMessage()]


def test_sidecar_of_a_folder_peft_saved_over_is_ignored(tmp_path, experts_available, caplog):
    """PEFT's save_pretrained into a moetune folder replaces adapter_config.json and the weights but
    leaves moetune_adapter.json; its targets must not override the new config's."""
    ours = _experts_model(tmp_path)
    folder = moetune.save_adapter(ours, tmp_path / "folder")
    sidecar = folder / "moetune_adapter.json"
    assert len(json.loads(sidecar.read_text())["adapter_config_sha256"]) == 64
    peft.PeftModel.from_pretrained(make_hf_model("qwen3_moe"), str(folder)).save_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="moetune"):  # the same adapter (PEFT reorders targets): still ours
        assert adapter_configs(_loaded(tmp_path / "base", folder))["default"].target_modules == ["q_proj", "experts"]
    assert not _sidecar_warnings(caplog)
    other = peft.get_peft_model(
        make_hf_model("qwen3_moe"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"])
    )
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    other.save_pretrained(folder)
    assert sidecar.is_file()
    with caplog.at_level(logging.WARNING, logger="moetune"):
        back = _loaded(tmp_path / "base", folder)
    warned = _sidecar_warnings(caplog)
    assert len(warned) == 1 and str(sidecar) in warned[0], warned
    config = adapter_configs(back)["default"]
    assert (config.r, config.alpha, config.target_modules) == (2, 4.0, ["v_proj"])
    assert (_logits(back, _ids()) - _logits(other, _ids())).abs().max() <= 1e-5


def test_sidecar_fingerprint_sees_config_edits_and_older_sidecars_are_trusted(tmp_path, caplog):
    save_hf_model("llama", tmp_path / "base")
    ours = moetune.load_model(tmp_path / "base")
    moetune.add_adapter(ours, moetune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    folder = moetune.save_adapter(ours, tmp_path / "folder")
    cfg_file, sidecar = folder / "adapter_config.json", folder / "moetune_adapter.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lora_dropout"] = 0.0  # a hand edit the sidecar's trained dropout would silently undo
    cfg_file.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="moetune"):
        assert adapter_configs(_loaded(tmp_path / "base", folder))["default"].dropout == 0.0
    assert len(_sidecar_warnings(caplog)) == 1
    caplog.clear()
    meta = json.loads(sidecar.read_text())
    del meta["adapter_config_sha256"]  # as written before sidecars carried a fingerprint
    sidecar.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="moetune"):
        assert adapter_configs(_loaded(tmp_path / "base", folder))["default"].dropout == 0.1
    assert not _sidecar_warnings(caplog)
