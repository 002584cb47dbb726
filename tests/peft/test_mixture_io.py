"""Mixture adapter files: moetune's layout and MoE-PEFT's MixLoRA layout, both ways."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetune
from moetune import LoraConfig
from moetune.config import MixtureConfig
from moetune.errors import AdapterError
from tiny_configs import DENSE, tiny_model

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _model():
    return tiny_model(DENSE).eval()


def _trained(config: LoraConfig, name="mix"):
    model = _model()
    moetune.add_adapter(model, config, name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moetune.trainable_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _logits(model, name):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    return model(ids, adapter_names=[name, name]).logits


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, use_dora=True, target_modules=TARGETS, mixture=MixtureConfig(num_experts=3, routing="top_p")),
        LoraConfig(r=4, target_modules=TARGETS, mixture=MixtureConfig(kind="mola", num_experts=[2, 3])),
        LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], mixture=MixtureConfig(kind="loramoe", num_experts=3)),
    ],
    ids=["mixdora", "mola", "loramoe"],
)
def test_moetune_layout_round_trip(tmp_path, config):
    model = _trained(config)
    folder = moetune.save_adapter(model, tmp_path / "a", name="mix")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MOETUNE_MIXTURE" and cfg["lora_config"]["mixture"]["kind"] == config.mixture.kind
    keys = load_file(str(folder / "adapter_model.safetensors"))
    if config.mixture.kind == "mixlora":
        assert keys["base_model.model.model.layers.0.mlp.gate_proj.experts.lora_A.weight"].shape == (3, 4, 32)
        assert keys["base_model.model.model.layers.0.mlp.down_proj.experts.lora_magnitude_vector"].shape == (3, 32)
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector" in keys  # DoRA attention
    fresh = _model()
    moetune.load_adapter(fresh, folder, name="back")
    torch.testing.assert_close(_logits(fresh, "back"), _logits(model, "mix"), atol=1e-6, rtol=1e-6)


def _moe_peft_config(**routing):
    return LoraConfig(
        r=4,
        alpha=8,
        target_modules=TARGETS,
        mixture=MixtureConfig(num_experts=3, expert_r=2, expert_alpha=4, router_aux_loss_coef=0.02, **routing),
    )


@pytest.mark.parametrize(
    "routing", [dict(routing="top_k", top_k=2), dict(routing="top_p", top_p=0.7, top_p_renormalize=False)]
)
def test_moe_peft_layout_round_trip(tmp_path, routing):
    model = _trained(_moe_peft_config(**routing))
    folder = moetune.save_adapter(model, tmp_path / "mp", name="mix", layout="moe_peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MIXLORA" and cfg["num_experts"] == 3
    assert cfg["routing_strategy"] == ("mixlora" if routing["routing"] == "top_k" else "mixlora-dynamic")
    assert cfg["target_modules"] == TARGETS and cfg["expert_lora"] == {"r": 2, "lora_alpha": 4}
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert keys["mixlora.layers.1.mlp.moe_gate.weight"].shape == (3, 32)
    assert keys["mixlora.layers.0.mlp.gate_proj.experts.2.lora_A.weight"].shape == (2, 32)
    assert keys["mixlora.layers.0.mlp.down_proj.experts.0.lora_B.weight"].shape == (32, 2)
    assert keys["mixlora.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert len(keys) == 2 * (1 + 3 * 3 * 2 + 2 * 2)
    fresh = _model()
    moetune.load_adapter(fresh, folder, name="back")
    torch.testing.assert_close(_logits(fresh, "back"), _logits(model, "mix"), atol=1e-6, rtol=1e-6)


def test_hand_written_moe_peft_file_loads(tmp_path):
    """A folder written from the documented layout alone (not by our exporter)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        tensors[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = torch.randn(2, 32, generator=g)
        for proj, (d_in, d_out) in {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}.items():
            for i in range(2):
                tensors[f"mixlora.layers.{layer}.mlp.{proj}.experts.{i}.lora_A.weight"] = torch.randn(
                    4, d_in, generator=g
                )
                tensors[f"mixlora.layers.{layer}.mlp.{proj}.experts.{i}.lora_B.weight"] = torch.randn(
                    d_out, 4, generator=g
                )
        for proj, d_out in (("q_proj", 32), ("k_proj", 16)):  # 2 kv heads of 8
            tensors[f"mixlora.layers.{layer}.self_attn.{proj}.lora_A.weight"] = torch.randn(4, 32, generator=g)
            tensors[f"mixlora.layers.{layer}.self_attn.{proj}.lora_B.weight"] = torch.randn(d_out, 4, generator=g) * 0.1
    folder = tmp_path / "hand"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "bias": "none",
                "peft_type": "MIXLORA",
                "r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.05,
                "target_modules": ["q_proj", "k_proj", "gate_proj", "down_proj", "up_proj"],
                "routing_strategy": "mixlora",
                "num_experts": 2,
                "top_k": 1,
            }
        )
    )
    model = _model()
    moetune.load_adapter(model, folder, name="mp")
    ffn = model.model.layers[1].mlp
    torch.testing.assert_close(ffn.router["mp"], tensors["mixlora.layers.1.mlp.moe_gate.weight"])
    torch.testing.assert_close(
        ffn.lora_B_down["mp"][1], tensors["mixlora.layers.1.mlp.down_proj.experts.1.lora_B.weight"]
    )
    assert model.model.layers[0].self_attn.k_proj.lora_A["mp"].shape == (4, 32)
    assert ffn.mixtures["mp"].mixture.top_k == 1 and ffn.options["mp"].scaling == 2.0


def test_moe_peft_errors_name_the_problem(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    base = {
        "peft_type": "MIXLORA",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["gate_proj"],
        "routing_strategy": "mixlora",
        "num_experts": 2,
    }
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    (folder / "adapter_config.json").write_text(json.dumps(base))
    with pytest.raises(AdapterError, match="weights_only=True"):
        moetune.load_adapter(_model(), folder)
    save_file({"mixlora.layers.0.mlp.moe_gate.weight": torch.zeros(2, 32)}, str(folder / "adapter_model.safetensors"))
    for change, needle in [
        ({"routing_strategy": "mixlora-switch"}, "mixlora-switch"),
        ({"use_dora": True}, "DoRA"),
        ({"optimizer": "adamw"}, "optimizer"),
    ]:
        (folder / "adapter_config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(AdapterError, match=needle):
            moetune.load_adapter(_model(), folder)
    (folder / "adapter_config.json").write_text(json.dumps(base))
    with pytest.raises(AdapterError, match="no tensors|missing"):
        moetune.load_adapter(_model(), folder)
    model = _trained(LoraConfig(r=4, target_modules=TARGETS, mixture=MixtureConfig(num_experts=2, routing="switch")))
    with pytest.raises(AdapterError, match="no MoE-PEFT equivalent"):
        moetune.save_adapter(model, tmp_path / "x", name="mix", layout="moe_peft")


def _as_moe_peft_trainer_wrote_it(cfg: dict) -> dict:
    """The adapter_config.json MoE-PEFT's trainer writes (``save_adapter_weight``: ``MixLoraConfig.export()``
    + ``base_model_name_or_path`` + ``task_type``; the expert config exported with bias and dropout)."""
    out = {k: cfg[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "routing_strategy", "num_experts")}
    out |= {"bias": "none", "lora_dropout": 0.05, "act_fn": "silu", "top_k": cfg["top_k"]}
    out["expert_lora"] = {"bias": "none", **cfg["expert_lora"], "lora_dropout": 0.05}
    return out | {"base_model_name_or_path": "/models/tiny", "task_type": "CAUSAL_LM"}


def test_moe_peft_trainer_folder_with_task_type_loads(tmp_path):
    """Defect 5: MoE-PEFT's saved configs carry task_type; they load with our logits."""
    model = _trained(_moe_peft_config(routing="top_k", top_k=2))
    folder = moetune.save_adapter(model, tmp_path / "mp", name="mix", layout="moe_peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(_as_moe_peft_trainer_wrote_it(cfg)))
    fresh = _model()
    moetune.load_adapter(fresh, folder, name="back")
    err = (_logits(fresh, "back") - _logits(model, "mix")).abs().max().item()
    print(f"MoE-PEFT trainer-style folder (task_type) -> moetune logits max|d| {err:.2e}")
    assert err <= 1e-5
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "SEQ_CLS"}))
    with pytest.raises(AdapterError, match="task_type 'SEQ_CLS'.*classification head"):
        moetune.load_adapter(_model(), folder, name="cls")


def test_moe_peft_export_is_what_its_loader_reads(tmp_path):
    """What MoE-PEFT's loader needs: adapter_model.bin (the only file it reads; same tensors as the
    safetensors file), task_type, integer r/alpha, a float dropout > 0 (its LoRA asserts it)."""
    model = _trained(_moe_peft_config(routing="top_k", top_k=2))  # trained with dropout 0
    folder = moetune.save_adapter(model, tmp_path / "mp", name="mix", layout="moe_peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and isinstance(cfg["lora_alpha"], int) and isinstance(cfg["r"], int)
    assert cfg["lora_dropout"] == 1e-9  # MoE-PEFT asserts > 0 and applies it at inference too
    ours = load_file(str(folder / "adapter_model.safetensors"))
    pickled = torch.load(folder / "adapter_model.bin", weights_only=True)  # our own file, read as tensors only
    assert pickled.keys() == ours.keys() and all(torch.equal(pickled[k], ours[k]) for k in ours)
    print(f"moe_peft export: {len(ours)} tensors, .bin {(folder / 'adapter_model.bin').stat().st_size} bytes")
    with pytest.raises(AdapterError, match="alpha 7.5 is not a whole number"):
        bad = _trained(dataclasses.replace(_moe_peft_config(routing="top_k", top_k=2), alpha=7.5))
        moetune.save_adapter(bad, tmp_path / "bad", name="mix", layout="moe_peft")
