"""Turn a :class:`TrainConfig` into the pieces of a run: device, model, tokenizer, data, adapters."""

from __future__ import annotations

import logging
import random
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import DataSplits, Tokenizer, check_tokenizer_fits, resolve_tokenizer
from ..errors import ConfigError
from ..model import CausalLM, load_model
from ..model.model_folder import model_args_from_folder
from ..peft.core.inject import add_adapter
from ..peft.formats.adapters import load_adapter
from ..peft.core.params import adapter_parameters
from .jobs import build_run_data

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | None, key: str = "model.device") -> torch.device:
    """``"auto"`` (or None): cuda when available, else cpu; else the device named (``key`` in messages)."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{key}: '{spec}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: '{spec}' asked for, but no CUDA device is available")
    return device


def check_writable(folder: str | os.PathLike, key: str = "checkpoint.output_dir") -> Path:
    """Fail before any work if the output folder cannot be created or written."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)  # unique: ranks probe at once
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to '{path}' ({exc.strerror or exc})") from None
    return path


@dataclass
class RunParts:
    model: CausalLM
    tokenizer: Tokenizer
    data: DataSplits
    device: torch.device
    dtype: torch.dtype


def prepare_run(
    config: TrainConfig,
    *,
    model: CausalLM | None = None,
    tokenizer: Tokenizer | None = None,
    shard: tuple[int, int] | None = None,
) -> RunParts:
    """Load (or take) the model and tokenizer, build the data, add the adapters.

    ``shard`` (rank, world) of an FSDP run: a base read as stored (FP8, INT4, MXFP4) is loaded with
    only this rank's rows, unless an adapter reads the base's values when it is made (DoRA's
    magnitude, an adapter loaded from a folder), which needs the whole base until it is sharded.
    """
    check_writable(config.checkpoint.output_dir)
    # One seed fixes adapter init and dropout masks, so two runs of a config are identical.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device, dtype = resolve_device(config.model.device), DTYPES[config.model.dtype]
    tokenizer = tokenizer or resolve_tokenizer(config.data.tokenizer, config.model.path)  # null: the model's own
    _check_tokenizer(config, tokenizer, model)
    data = build_run_data(config.data, tokenizer, config.seed, config.optim.objective)
    log.info(data.report.summary())
    if model is None:
        if shard is not None and not all(s.path is None and not s.to_lora_config().use_dora for s in config.adapters):
            log.info("loading the whole base on every rank before sharding: an adapter reads its values when made")
            shard = None
        model = load_model(config.model.path, dtype=dtype, device=device, quantize=config.model.quantize, shard=shard)
    for section in config.adapters:
        torch.manual_seed(config.seed)  # each adapter starts as it would alone (adapters trained together == alone)
        if section.path is not None:  # an earlier adapter: its rank, alpha and targets come from its folder
            load_adapter(model, section.path, name=section.name)
        else:
            add_adapter(model, section.to_lora_config(), name=section.name)
    reference = config.reference_adapter  # preference.reference: initial: the starting adapter, kept as it is
    if reference is not None:
        load_adapter(model, config.adapters[0].path, name=reference)
    frozen = [s.name for s in config.adapters if s.frozen] + ([reference] if reference else [])
    for name in frozen:  # after every add_adapter, which marks all adapter parameters trainable
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(False)
    _set_step_options(model, config)
    return RunParts(model=model, tokenizer=tokenizer, data=data, device=device, dtype=dtype)


def _set_step_options(model: CausalLM, config: TrainConfig) -> None:
    """Activation checkpointing and compiled blocks, as the run file says."""
    model.set_gradient_checkpointing(config.optim.activation_checkpointing)
    if config.train.compile:
        model.compile_blocks()
        log.info(
            "train.compile: the forward of each of the %d decoder blocks is compiled (torch.compile, "
            "fullgraph=True); the first steps trace and compile",
            len(model.model.layers),
        )


def _check_tokenizer(config: TrainConfig, tokenizer: Tokenizer, model: CausalLM | None) -> None:
    """The check eval and generate make, before the data is tokenized and the weights load."""
    vocab = model.args.vocab_size if model is not None else model_args_from_folder(config.model.path).vocab_size
    if config.data.tokenizer:
        key, advice = f"data.tokenizer '{config.data.tokenizer}'", "use the model's own (data.tokenizer: null)"
    else:
        key = f"the tokenizer of {config.model.path} (data.tokenizer: null)"
        advice = "name the one the model was trained with as data.tokenizer"
    check_tokenizer_fits(tokenizer, vocab, key=key, advice=advice)
