"""Config dataclasses, from_dict, run-file loading, overrides and dumping."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from moetune.config import (
    AdapterSection,
    DataSection,
    LoraConfig,
    OptimSection,
    TrainConfig,
    dump_config,
    from_dict,
    load_train_config,
)
from moetune.errors import ConfigError

RUN = """\
model: {path: ./tiny-moe, dtype: bf16}
adapter:
  r: 16
  alpha: 32
  target_modules: [q_proj, experts]
data:
  train: data/train.jsonl
  packing: true
optim:
  lr: 1e-4
  max_steps: 10
  batch_size: 2
checkpoint: {output_dir: runs/demo}
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(func, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        func(*args, **kwargs)
    return str(info.value)


def test_lora_defaults_and_scaling() -> None:
    config = LoraConfig()
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.scaling == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))
    assert isinstance(LoraConfig(alpha=4).alpha, float)
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"r": 0}, "r must be an integer >= 1, got 0"),
        ({"r": True}, "r: expected an integer, got true"),
        ({"r": "8"}, "r: expected an integer, got '8'"),
        ({"alpha": -1}, "alpha must be a number > 0, got -1.0"),
        ({"dropout": 1.0}, "dropout must be a number in [0, 1), got 1.0"),
        (
            {"init": "kaimin"},
            "init: expected one of 'kaiming', 'gaussian', 'pissa', got 'kaimin' (did you mean 'kaiming'?)",
        ),
        ({"target_modules": "q_proj"}, "target_modules must be a list of names or 'all-linear'"),
        ({"target_modules": ["q_proj", 3]}, "target_modules[1]: expected a string, got 3"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"target_regex": "(q_proj"}, "target_regex is not a valid regular expression"),
        ({"target_regex": ".*q", "target_modules": ["v_proj"]}, "target_modules must be left out when target_regex"),
        ({"layers_to_transform": [0, -1]}, "layers_to_transform must be layer indices >= 0"),
        ({"expert_rank": "each"}, "expert_rank: expected one of 'per_expert', 'shared', got 'each'"),
        ({"bias": "all"}, "bias: expected 'none', got 'all'"),
    ],
)
def test_lora_rejects_bad_values(kwargs: dict, expected: str) -> None:
    assert expected in error_of(LoraConfig, **kwargs)


def test_target_regex_replaces_the_default_list() -> None:
    config = LoraConfig(target_regex=r".*\.(q|v)_proj")
    assert config.target_modules == []
    assert LoraConfig(**config.to_dict()) == config


def test_adapter_method_dora() -> None:
    assert AdapterSection(method="dora").use_dora
    assert AdapterSection(method="dora").to_lora_config() == LoraConfig(use_dora=True)
    assert "use_dora: true contradicts method: lora" in error_of(AdapterSection, use_dora=True)
    assert "name must be letters" in error_of(AdapterSection, name="my adapter")


def test_from_dict_unknown_key_did_you_mean() -> None:
    data = {"max_steps": 3, "batch_size": 1, "lr_shedule": "cosine"}
    assert error_of(from_dict, OptimSection, data, "run.yaml") == (
        "run.yaml: unknown key 'lr_shedule' (did you mean 'lr_schedule'?)"
    )
    assert "(allowed: lr, weight_decay" in error_of(from_dict, OptimSection, {"zzz": 1}, "run.yaml")


def test_from_dict_types() -> None:
    optim = from_dict(
        OptimSection,
        {"max_steps": 3, "batch_size": 1, "lr": 1, "betas": [0.9, 0.95], "eps": "1e-6", "max_grad_norm": None},
        "x",
    )
    assert optim.lr == 1.0 and isinstance(optim.lr, float)
    assert optim.betas == (0.9, 0.95) and optim.eps == 1e-6 and optim.max_grad_norm is None
    assert "x: missing required key 'batch_size' (an integer)" == error_of(
        from_dict, OptimSection, {"max_steps": 3}, "x"
    )
    assert "x: betas: expected a list of 2 numbers, got [0.9]" == error_of(
        from_dict, OptimSection, {"max_steps": 3, "batch_size": 1, "betas": [0.9]}, "x"
    )
    assert "x: max_grad_norm: expected a number or null, got 'big'" == error_of(
        from_dict, OptimSection, {"max_steps": 3, "batch_size": 1, "max_grad_norm": "big"}, "x"
    )
    assert "expected a finite number" in error_of(
        from_dict, OptimSection, {"max_steps": 3, "batch_size": 1, "lr": float("nan")}, "x"
    )
    assert "x: expected a mapping of OptimSection keys, got [1]" == error_of(from_dict, OptimSection, [1], "x")


def test_load_run_file(tmp_path: Path) -> None:
    config = load_train_config(write(tmp_path, RUN))
    assert isinstance(config, TrainConfig)
    assert [a.name for a in config.adapters] == ["default"]
    assert config.adapters[0].r == 16 and config.adapters[0].alpha == 32.0
    assert config.optim.lr == 1e-4 and config.data.packing is True
    assert config.data.tokenizer is None  # the model folder's tokenizer (tests/data/test_tokenizer_default.py)
    assert config.logging.log_every == 1


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, RUN.replace("data/train.jsonl", "../shared/train.jsonl"), "configs/run.yaml")
    monkeypatch.chdir(tmp_path / "configs")
    os.chdir("/")  # the current directory must not matter for paths in the file
    config = load_train_config(path)
    assert config.model.path == str(tmp_path / "configs" / "tiny-moe")
    assert config.data.train == str(tmp_path / "shared" / "train.jsonl")
    assert config.checkpoint.output_dir == str(tmp_path / "configs" / "runs" / "demo")
    # Overrides are command-line arguments: they resolve against the current directory.
    monkeypatch.chdir(tmp_path)
    config = load_train_config(path, ["data.eval=val.jsonl", "data.tokenizer=tok", "model.path=/abs/m"])
    assert config.data.eval == str(tmp_path / "val.jsonl")
    assert config.data.tokenizer == str(tmp_path / "tok")
    assert config.model.path == "/abs/m"


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("lr: 1e-4", "lr_shedule: cosine", "run.yaml: unknown key 'optim.lr_shedule' (did you mean 'lr_schedule'?)"),
        ("batch_size: 2", "batch_size: two", "run.yaml: optim.batch_size: expected an integer, got 'two'"),
        ("packing: true", "packing: 1", "run.yaml: data.packing: expected true or false, got 1"),
        ("dtype: bf16", "dtype: bf61", "model.dtype: expected one of 'fp32', 'bf16', 'fp16', got 'bf61'"),
        ("  r: 16", "  r: 0", "run.yaml: adapter.r must be an integer >= 1, got 0"),
        ("  alpha: 32", "  alhpa: 32", "run.yaml: unknown key 'adapter.alhpa' (did you mean 'alpha'?)"),
        ("max_steps: 10", "max_steps: 10\n  warmup_steps: 20", "optim.warmup_steps must be in [0, max_steps], got 20"),
        ("checkpoint: {output_dir: runs/demo}", "", "run.yaml: missing required key 'checkpoint'"),
    ],
)
def test_run_file_errors(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in RUN
    message = error_of(load_train_config, write(tmp_path, RUN.replace(old, new)))
    assert expected in message
    assert str(tmp_path / "run.yaml") in message


def test_train_compile_switch(tmp_path: Path) -> None:
    assert load_train_config(write(tmp_path, RUN)).train.compile is False
    assert load_train_config(tmp_path / "run.yaml", ["train.compile=true"]).train.compile is True
    assert "unknown key 'train.compiel' in override 'train.compiel=true' (did you mean 'compile'?)" in error_of(
        load_train_config, tmp_path / "run.yaml", ["train.compiel=true"]
    )
    mixture = write(tmp_path, RUN.replace("  r: 16", "  method: mixlora\n  r: 16"), "mix.yaml")
    message = error_of(load_train_config, mixture, ["train.compile=true"])
    assert "train.compile: true cannot compile mixture adapters (adapters[0])" in message, message


def test_adapters_list(tmp_path: Path) -> None:
    text = RUN.replace(
        "adapter:\n  r: 16\n  alpha: 32\n  target_modules: [q_proj, experts]\n",
        "adapters:\n  - {name: a, r: 4}\n  - {name: b, method: dora, target_modules: all-linear}\n",
    )
    config = load_train_config(write(tmp_path, text))
    assert [(a.name, a.r, a.use_dora) for a in config.adapters] == [("a", 4, False), ("b", 8, True)]
    config = load_train_config(tmp_path / "run.yaml", ["adapters.1.r=2"])
    assert config.adapters[1].r == 2
    assert "adapters[1].r: expected an integer, got 'x'" in error_of(
        load_train_config, tmp_path / "run.yaml", ["adapters.1.r=x"]
    )
    assert "needs an index below 2" in error_of(load_train_config, tmp_path / "run.yaml", ["adapters.5.r=2"])
    assert "write adapters.N.r" in error_of(load_train_config, tmp_path / "run.yaml", ["adapter.r=2"])
    same = write(tmp_path, text.replace("name: b", "name: a"), "same.yaml")
    assert "adapters must be uniquely named, got ['a', 'a']" in error_of(load_train_config, same)
    both = write(tmp_path, text + "adapter: {r: 2}\n", "both.yaml")
    assert "either 'adapter' (one) or 'adapters' (a list), not both" in error_of(load_train_config, both)


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, RUN)
    config = load_train_config(
        path,
        [
            "optim.lr=3e-4",
            "data.packing=false",
            "adapter.r=4",
            "adapter.target_modules=[q_proj, v_proj]",
            "logging.eval_every=5",
            "optim.max_grad_norm=null",
            "seed=7",
        ],
    )
    assert config.optim.lr == 3e-4 and config.data.packing is False
    assert config.adapters[0].r == 4 and config.adapters[0].target_modules == ["q_proj", "v_proj"]
    assert config.logging.eval_every == 5 and config.optim.max_grad_norm is None and config.seed == 7


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "optim.lr_shedule=linear",
            "unknown key 'optim.lr_shedule' in override 'optim.lr_shedule=linear' (did you mean 'lr_schedule'?)",
        ),
        ("optimm.lr=1", "unknown key 'optimm' in override 'optimm.lr=1' (did you mean 'optim'?)"),
        ("optim.lr", "override 'optim.lr': expected key.sub=value"),
        ("=3", "override '=3': expected key.sub=value"),
        ("optim.lr=abc", "override: optim.lr: expected a number, got 'abc'"),
        ("optim.lr.x=1", "'optim.lr' is a value, not a section"),
        ("data.max_length=[1", "override 'data.max_length=[1' line 1: invalid YAML"),
    ],
)
def test_override_errors(tmp_path: Path, override: str, expected: str) -> None:
    assert expected in error_of(load_train_config, write(tmp_path, RUN), [override])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: {path: x}\noptim:\n  lr: 1\n   max_steps: 3\n", "run.yaml line 4: invalid YAML"),
        ("model: {path: x}\nseed: 1\nseed: 2\n", "run.yaml line 3: invalid YAML: duplicate key 'seed'"),
        ("", "run.yaml: the file is empty"),
        ("- a\n- b\n", "run.yaml: expected a mapping at the top level"),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(load_train_config, write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    assert "config file not found" in error_of(load_train_config, tmp_path / "nope.yaml")


def test_data_section_rules() -> None:
    assert "give either eval or val_fraction" in error_of(DataSection, train="t", eval="e", val_fraction=0.1)
    assert "val_fraction must be a number in [0, 1)" in error_of(DataSection, train="t", val_fraction=1)


def test_dump_round_trip(tmp_path: Path) -> None:
    config = load_train_config(write(tmp_path, RUN), ["adapter.target_regex=.*q_proj", "adapter.target_modules=[]"])
    text = dump_config(config)
    assert text.startswith("model:\n  path: ")
    assert "adapters:\n- name: default\n  method: lora\n" in text
    again = load_train_config(write(tmp_path, text, "dumped/run.yaml"))
    assert again == config
