"""Typed configuration: LoRA options and the training run file, with YAML in and out.

Every config is a small keyword-only dataclass. Its ``__post_init__`` first checks each field
against its type annotation (so ``LoraConfig(r="8")`` fails as loudly as a bad YAML file), then
runs the section's ``validate()`` for ranges and cross-field rules. :func:`from_dict` builds any
of these dataclasses, nested ones included, from a plain mapping and rejects unknown keys with a
"did you mean" hint.

A run file looks like::

    model: {path: ./tiny-moe, dtype: bf16}
    adapter: {r: 16, alpha: 32, target_modules: [q_proj, v_proj, experts]}
    data: {train: data/train.jsonl, max_length: 1024, packing: true}
    optim: {lr: 2e-4, max_steps: 100, batch_size: 4}
    checkpoint: {output_dir: runs/demo}

The adapter is written either as one ``adapter:`` mapping or as an ``adapters:`` list (several
adapters trained at once); both become :attr:`TrainConfig.adapters`. LoRA options sit directly in
the adapter mapping (flattened, no ``lora:`` level); ``method: dora`` turns on DoRA.

Paths: a relative path written in the config file (``model.path``, ``data.train``, ``data.eval``,
``data.tokenizer``, ``checkpoint.output_dir``) resolves against the folder holding that file, so a
run file works from any current directory. A relative path given as a command-line override
resolves against the current directory, like any other command-line argument.
"""

from moetune.errors import ConfigError

from .adapter import AdaLoraOptions, DEFAULT_TARGETS, LoraConfig, MIXTURE_KINDS, MixtureConfig, ROUTINGS
from .run_file import dump_config, load_train_config
from .schema import ConfigFieldError, ConfigSection, Key, check_types, dotted, from_dict, to_plain
from .sections import (
    CheckpointSection,
    DataSection,
    DistillSection,
    DistributedSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    TrainSection,
)
from .train import AdapterSection, DataOverride, METHOD_KINDS, OptimOverride, TrainConfig

__all__ = [
    "AdaLoraOptions",
    "AdapterSection",
    "CheckpointSection",
    "ConfigError",
    "ConfigFieldError",
    "ConfigSection",
    "DEFAULT_TARGETS",
    "DataOverride",
    "DataSection",
    "DistillSection",
    "DistributedSection",
    "Key",
    "LoggingSection",
    "LoraConfig",
    "METHOD_KINDS",
    "MIXTURE_KINDS",
    "MixtureConfig",
    "ModelSection",
    "OptimOverride",
    "OptimSection",
    "ROUTINGS",
    "TrainConfig",
    "TrainSection",
    "check_types",
    "dotted",
    "dump_config",
    "from_dict",
    "load_train_config",
    "to_plain",
]
