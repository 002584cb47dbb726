"""Issue 16, silently wrong results: LoRA+ reaches every adapter kind's B side, add_adapter keeps
adapters the user froze frozen, and a config value equal to its default still counts as given."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune import LoraConfig
from moetune.config import DEFAULT_TARGETS, AdaLoraOptions, MixtureConfig
from moetune.config.train import AdapterSection
from moetune.errors import ConfigError
from moetune.peft.core.layer import adapter_layers
from moetune.peft.core.params import adapter_parameters
from tiny_configs import DENSE, MOE, tiny_model
from train_helpers import loraplus_optimizer, lr_of

FFN = ["gate_proj", "up_proj", "down_proj"]


def _model(cfg: dict):
    return tiny_model(cfg)


def _mix(kind: str, **kw) -> MixtureConfig:
    return MixtureConfig(kind=kind, num_experts=4, **kw)


# kind -> (model config, adapter config); every adapter layer class the injector can create
KINDS = {
    "lora": (DENSE, LoraConfig(r=4, target_modules=["q_proj", "down_proj"])),
    "experts": (MOE, LoraConfig(r=4, target_modules=["experts", "shared_expert"])),
    "experts_split": (MOE, LoraConfig(r=4, target_modules=["experts.gate_proj", "experts.down_proj"])),
    "dora": (DENSE, LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"])),
    "adalora": (MOE, LoraConfig(r=4, target_modules=["q_proj", "experts"], adalora=AdaLoraOptions(target_r=2))),
    "mixlora": (DENSE, LoraConfig(r=4, target_modules=["q_proj", *FFN], mixture=_mix("mixlora"))),
    "mixdora": (DENSE, LoraConfig(r=4, use_dora=True, target_modules=FFN, mixture=_mix("mixlora"))),
    "mola": (DENSE, LoraConfig(r=4, target_modules=["q_proj", "v_proj", *FFN], mixture=_mix("mola"))),
    "loramoe": (DENSE, LoraConfig(r=4, target_modules=["o_proj", *FFN], mixture=_mix("loramoe"))),
}


def _is_b(key: str) -> bool:
    """Test oracle: the output-side matrix of a pair is the container named ``*lora_B*``."""
    return "lora_B" in key.rsplit(".", 2)[-2]


@pytest.mark.parametrize("kind", list(KINDS))
def test_loraplus_gives_every_b_side_parameter_the_higher_lr(kind):
    cfg, lora = KINDS[kind]
    model = _model(cfg)
    moetune.add_adapter(model, lora, name="a")
    params = adapter_parameters(model, "a")
    b_keys = {k for k in params if _is_b(k)}
    assert b_keys and len(b_keys) < len(params)
    if kind in ("mola", "loramoe"):
        assert any(".moe_lora_B." in k for k in b_keys)  # the instance in the issue
    lrs = lr_of(loraplus_optimizer(params))
    assert len(lrs) == len(params)
    wrong = [k for k, p in params.items() if lrs[id(p)] != (16e-3 if k in b_keys else 1e-3)]
    assert not wrong, f"{kind}: wrong LoRA+ group for {wrong}"


def test_every_adapter_layer_declares_its_b_side():
    """The optimizer asks the layer (no name pattern): each layer class in use says which side is B."""
    seen = set()
    for cfg, lora in KINDS.values():
        model = _model(cfg)
        moetune.add_adapter(model, lora, name="a")
        for _, layer in adapter_layers(model):
            b = {id(p) for _, p in layer.b_side_params("a")}
            names = {local for local, p in layer.adapter_params("a") if id(p) in b}
            assert names and all(_is_b(f"x.{n}") for n in names), (type(layer).__name__, names)
            seen.add(type(layer).__name__)
    assert {"LoraLinear", "MixtureLinear", "MixtureFFN", "LoraGroupedExperts"} <= seen


def test_loraplus_without_a_b_side_declaration_is_refused():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="b_side"):
        loraplus_optimizer({"x.moe_lora_A.a": a, "x.moe_lora_B.a": b})
    opt = loraplus_optimizer({"x.A": a, "x.B": b}, b_side={"x.B"})
    assert lr_of(opt) == {id(a): 1e-3, id(b): 16e-3}


# --- add_adapter keeps what the user froze ----------------------------------------------------
@pytest.mark.parametrize("second", ["lora", "mola", "experts"])
def test_add_adapter_leaves_a_frozen_adapter_frozen(second):
    model = _model(MOE if second == "experts" else DENSE)
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="old")
    frozen = adapter_parameters(model, "old")
    for p in frozen.values():
        p.requires_grad_(False)
    new = KINDS[second][1]
    moetune.add_adapter(model, new, name="new")  # mola shares q_proj/v_proj wrappers with "old"
    assert not [k for k, p in adapter_parameters(model, "old").items() if p.requires_grad]
    assert all(p.requires_grad for p in adapter_parameters(model, "new").values())
    adapter_ids = {id(p) for n in ("old", "new") for p in adapter_parameters(model, n).values()}
    assert not [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]


def test_add_adapter_keeps_a_trainable_adapter_trainable():
    model = _model(DENSE)
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), name="one")
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"]), name="two")
    assert all(p.requires_grad for n in ("one", "two") for p in adapter_parameters(model, n).values())


# --- a value equal to its default is still a value given ---------------------------------------
def test_adalora_r_equal_to_the_default_contradicting_init_r_is_an_error():
    with pytest.raises(ConfigError, match="adalora.init_r"):
        LoraConfig(r=8, adalora=AdaLoraOptions(init_r=16, target_r=4))
    assert LoraConfig(adalora=AdaLoraOptions(init_r=16, target_r=4)).r == 16  # r left out: init_r wins
    assert LoraConfig(r=16, adalora=AdaLoraOptions(init_r=16, target_r=4)).r == 16


def test_run_file_adalora_r_8_is_kept_or_refused(tmp_path):
    from moetune.config import load_train_config

    run = tmp_path / "run.yaml"
    base = (
        "model: {path: m}\ndata: {train: t.jsonl}\noptim: {max_steps: 10, batch_size: 2}\n"
        "checkpoint: {output_dir: out}\n"
    )
    run.write_text(base + "adapter: {method: adalora, r: 8, adalora: {init_r: 16, target_r: 4}}\n")
    with pytest.raises(ConfigError, match=r"adapter\.r"):
        load_train_config(run)
    run.write_text(base + "adapter: {method: adalora, adalora: {init_r: 16, target_r: 4}}\n")
    assert load_train_config(run).adapters[0].r == 16
    run.write_text(base + "adapter: {method: adalora, r: 16, adalora: {target_r: 4}}\n")
    assert load_train_config(run, ["adapter.r=8"]).adapters[0].r == 8  # an override to the default is given


def test_default_target_list_written_out_beside_a_regex_is_an_error():
    with pytest.raises(ConfigError, match="target_modules"):
        LoraConfig(target_modules=list(DEFAULT_TARGETS), target_regex=r".*\.q_proj")
    assert LoraConfig(target_regex=r".*\.q_proj").target_modules == []
    section = AdapterSection(name="x", target_regex=r".*\.q_proj")
    assert section.to_lora_config().target_modules == []  # a rebuilt config keeps validating


def test_given_keys_survive_copies():
    import copy

    cfg = LoraConfig(r=8, adalora=AdaLoraOptions(init_r=8, target_r=4))
    again = copy.deepcopy(cfg)
    assert again == cfg and again.r == 8
