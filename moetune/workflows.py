"""Library functions behind the inference-side CLI subcommands: eval, generate, merge, export."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataSection, dump_config, load_train_config
from .data import build_datasets, eval_batches, instruction_prompt
from .errors import ConfigError
from .evaluation import RouterTally, TaskResult, evaluate_tasks
from .model import load_model
from .model.loading import read_hf_config
from .model.quant import dequantize_model, quantized_bytes
from .model.requantize import checked_plan, requantize_plan
from .model.generate import SamplingConfig, generate
from .model.saving import GENERATION_FILES, TOKENIZER_FILES, companion_files
from .outputs import check_output
from .peft.arithmetic.combine import METHODS
from .peft.arithmetic.folders import combine_adapter_folders
from .peft.formats.adapters import load_adapter, save_adapter
from .peft.formats.mixtures import MIXTURE_TYPES, folder_peft_type, not_a_mixture
from .peft.formats.per_expert import FUSED_SERVING, check_vllm_export
from .peft.lora.fold import fold_adapter as merge_adapter
from .train.checkpoint_adapter import is_training_checkpoint, load_checkpoint_adapter
from .train.launch import is_main_process
from .train.setup import resolve_device
from .train.trainer import train
from .tokenizer_choice import default_tokenizer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model_path) -> torch.dtype:
    """The dtype a Hugging Face folder's config.json declares (``dtype`` or ``torch_dtype``), else fp32."""
    cfg = read_hf_config(model_path)
    cfg = cfg.get("text_config", cfg) if "dtype" not in cfg and "torch_dtype" not in cfg else cfg
    return CHECKPOINT_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), torch.float32)


def resolve_dtype(model_path, spec: str | None) -> torch.dtype:
    """``None``/``"auto"``: the checkpoint's own dtype; else ``fp32``/``bf16``/``fp16``."""
    if spec in (None, "auto"):
        return checkpoint_dtype(model_path)
    if spec not in DTYPES:
        raise ConfigError(f"--dtype: '{spec}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def load_with_adapter(
    model_path, adapter: str | None, *, dtype: str | None = None, device: str | None = None, dequantize: bool = False
) -> tuple[torch.nn.Module, str]:
    """The base (in the checkpoint's dtype unless ``dtype`` says otherwise) with ``adapter`` loaded:
    a PEFT-format folder (as ``"default"``) or a training checkpoint folder (``checkpoints/checkpoint-N``,
    under the run's adapter name); with ``dequantize`` a stored (FP8, INT4, MXFP4) base is dequantized
    to that dtype first. Returns the model and the adapter's name."""
    model = load_model(
        model_path, dtype=resolve_dtype(model_path, dtype), device=resolve_device(device, key="--device")
    )
    if dequantize and quantized_bytes(model)[1]:
        model.requantize = requantize_plan(model)  # what the stored weights were, for merge --requantize
        dequantize_model(model)
    name = "default"
    if adapter and is_training_checkpoint(adapter):
        name = load_checkpoint_adapter(model, adapter)
    elif adapter:
        load_adapter(model, adapter, name=name)
    return model.eval(), name


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    examples: int
    router: str = ""  # router statistics (base MoE layers, adapter mixtures)

    def summary(self) -> str:
        line = (
            f"loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  "
            f"({self.tokens:,} scored tokens, {self.examples} examples)"
        )
        return line + ("\n" + self.router if self.router else "")


@dataclass(frozen=True)
class EvalSetup:
    """What ``moetune eval`` scores and how, whatever it scores it on: the base folder, an adapter
    (PEFT-format folder or training checkpoint; None: the base alone), the tokenizer (as
    ``data.tokenizer`` in a run), tokens per example, examples per forward, dtype (default: the
    checkpoint's) and device (default: CUDA when available)."""

    model_path: str | os.PathLike
    adapter: str | os.PathLike | None = None
    tokenizer: str | None = None
    max_length: int = 1024
    batch_size: int = 8
    dtype: str | None = None
    device: str | None = None

    def load_tokenizer(self):
        return default_tokenizer(self.model_path, self.tokenizer, self.adapter)

    def load_model(self) -> torch.nn.Module:
        return load_with_adapter(self.model_path, self.adapter, dtype=self.dtype, device=self.device)[0]


@torch.no_grad()
def evaluate_file(setup: EvalSetup, data_file, *, train_on_prompt: bool = False) -> EvalResult:
    """Token-weighted loss and perplexity of base (or base + adapter) on a JSONL file."""
    tok = setup.load_tokenizer()
    section = DataSection(
        train=str(data_file), max_length=setup.max_length, train_on_prompt=train_on_prompt, tokenizer="byte"
    )
    examples = build_datasets(section, tok).train
    model = setup.load_model()
    on = next(model.parameters()).device
    total, count, tally = 0.0, 0, RouterTally()
    for batch in eval_batches(examples, batch_size=setup.batch_size, pad_id=tok.pad_id):
        batch = {k: v.to(on) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        out = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            position_ids=batch.get("position_ids"),
        )
        total += out.loss.item() * n
        count += n
        tally.add(model, out, float(n))
    loss = total / max(count, 1)
    return EvalResult(
        loss=loss, perplexity=math.exp(min(loss, 50)), tokens=count, examples=len(examples), router=tally.summary()
    )


@torch.no_grad()
def evaluate_task_files(setup: EvalSetup, files: list[str], *, chat: bool = False) -> list[TaskResult]:
    """Multiple-choice accuracy per task file (see :mod:`moetune.evaluation`)."""
    tok, model = setup.load_tokenizer(), setup.load_model()
    return evaluate_tasks(model, tok, list(files), batch_size=setup.batch_size, max_length=setup.max_length, chat=chat)


def generate_text(
    model_path,
    prompts: list[str],
    *,
    adapter=None,
    tokenizer=None,
    chat: bool = True,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> list[str]:
    """Continue each prompt and return the decoded text (``temperature`` 0: greedy; else sampled with
    nucleus ``top_p`` and ``seed``). With ``chat`` a prompt is formatted as training formats an
    instruction (:func:`moetune.data.instruction_prompt`: the chat template's user turn, else
    ``### Instruction:`` ... ``### Response:``); without, it is sent as it is (after bos)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    tok = default_tokenizer(model_path, tokenizer, adapter)
    model, _ = load_with_adapter(model_path, adapter, dtype=dtype, device=device)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    ids = [instruction_prompt(tok, p) if chat else bos + tok.encode(p) for p in prompts]
    outs = generate(model, ids, eos_id=tok.eos_id, pad_id=tok.pad_id if tok.pad_id is not None else 0, config=sampling)
    return [tok.decode(o) for o in outs]


def train_from_file(
    config_path, overrides: list[str] = (), *, resume=None, overwrite: bool = False, print_config: bool = False
) -> str | None:
    """``moetune train``: the resolved config (``print_config``) or the run's summary; None on ranks
    other than 0 under torchrun (rank 0 speaks for the run)."""
    config = load_train_config(config_path, list(overrides))
    if print_config:
        return dump_config(config)
    result = train(config, resume=resume, overwrite=overwrite)
    return result.summary() if is_main_process() else None


COMBINE_METHODS: tuple[str, ...] = tuple(METHODS)  # the --method choices of merge-adapters


def combine_adapters(model_path, adapters: list[str], out_dir, **options) -> str:
    """``moetune merge-adapters``: combine adapter folders of one base into a new folder (see
    :func:`moetune.peft.arithmetic.folders.combine_adapter_folders` for ``options``); its summary."""
    return combine_adapter_folders(model_path, adapters, out_dir, **options).summary()


def load_to_write(
    model_path, adapter, out_dir, what: str, *, overwrite: bool, dequantize: bool = False, **load
) -> tuple[torch.nn.Module, str]:
    """Base + adapter (:func:`load_with_adapter`; ``load``: its ``dtype``, ``device``) for a command
    that writes a ``what`` ("model", "adapter") into ``out_dir``, which is checked first, before
    minutes of loading."""
    check_output(out_dir, what, overwrite=overwrite, inputs=(model_path, adapter))
    return load_with_adapter(model_path, adapter, dequantize=dequantize, **load)


def merge_to_checkpoint(
    model_path, adapter, out_dir, *, tokenizer: str | None = None, requantize: bool = False, overwrite: bool = False,
    **load,
) -> Path:
    """Fold an adapter into the base and write a plain Hugging Face checkpoint, in the base's dtype
    unless ``dtype`` says otherwise, with the base folder's generation config and the tokenizer
    files of ``tokenizer`` (a folder; default: the base folder's), so it generates as base + adapter did.
    A base released quantized is written dequantized, or with ``requantize`` in its own format (FP8, INT4).
    ``load``: ``dtype``, ``device`` of :func:`load_with_adapter`.
    """
    files = merged_companions(model_path, tokenizer)
    model, name = load_to_write(model_path, adapter, out_dir, "model", overwrite=overwrite, dequantize=True, **load)
    plan = checked_plan(model, model_path) if requantize else None
    merge_adapter(model, name=name)
    inputs = (model_path, adapter)
    return model.save_pretrained(out_dir, overwrite=overwrite, inputs=inputs, extra_files=files, requantize=plan)


def merged_companions(model_path, tokenizer: str | None) -> dict[str, Path]:
    """Generation config from the base; tokenizer files from ``tokenizer`` (a folder) or the base."""
    if tokenizer == "byte":
        raise ConfigError(
            "--tokenizer byte: the built-in byte tokenizer has no files to write into a model folder; "
            "drop --tokenizer (the base folder's tokenizer files are copied) or give a tokenizer folder"
        )
    if tokenizer is not None:
        found = companion_files(tokenizer, TOKENIZER_FILES)
        if "tokenizer.json" not in found and "tokenizer.model" not in found:
            raise ConfigError(f"--tokenizer: '{tokenizer}' holds no tokenizer.json or tokenizer.model to copy")
        return {**companion_files(model_path, GENERATION_FILES), **found}
    return companion_files(model_path)


# Which layout each reader loads, and whether it needs the scaling folded into B (docs/serving.md).
EXPORT_READERS: dict[str, tuple[str, bool]] = {
    "peft": ("peft", False),
    "vllm": ("per_expert", False),
    "sglang": ("per_expert", True),
    "moe_peft": ("moe_peft", False),
}
log = logging.getLogger(__name__)


def export_plan(layout: str | None, reader: str | None, fold_scaling: bool) -> tuple[str, bool]:
    """(layout, fold_scaling) for ``export``: ``reader`` (``--for``) chooses both; ``layout`` alone
    defaults to PEFT's; a layout or fold that contradicts ``reader`` is an error."""
    if reader is None:
        return layout or "peft", fold_scaling
    if reader not in EXPORT_READERS:
        raise ConfigError(f"--for: '{reader}' is not one of {', '.join(EXPORT_READERS)}")
    want, fold = EXPORT_READERS[reader]
    if layout not in (None, want):
        raise ConfigError(f"--layout {layout} contradicts --for {reader}, which reads the {want} layout")
    return want, fold or fold_scaling


def export_adapter(
    model_path, adapter, out_dir, *, layout: str | None = None, reader: str | None = None, fold_scaling: bool = False,
    overwrite: bool = False, **load,
) -> Path:
    """Re-save an adapter for a reader (``reader``: peft, vllm, sglang, moe_peft) or in a layout
    (peft, per_expert, moe_peft; ``fold_scaling``: the scaling folded into B, per_expert only);
    ``load``: ``dtype``, ``device`` of :func:`load_with_adapter`."""
    chosen, fold_scaling = export_plan(layout, reader, fold_scaling)
    if chosen == "moe_peft" and folder_peft_type(adapter) not in (None, *MIXTURE_TYPES):  # before minutes of loading
        raise ConfigError(not_a_mixture(f"--adapter '{adapter}'"))
    model, name = load_to_write(model_path, adapter, out_dir, "adapter", overwrite=overwrite, **load)
    if reader == "vllm" and layout is None and model.args.family in FUSED_SERVING:
        chosen = "peft"
        log.info("vLLM reads %s expert adapters in PEFT's fused layout: writing that", model.args.family)
    layout = chosen
    if reader == "vllm":
        check_vllm_export(model, name, fused=model.args.family in FUSED_SERVING)
    out = save_adapter(model, out_dir, name=name, layout=layout, fold_scaling=fold_scaling, overwrite=overwrite)
    return Path(out)
