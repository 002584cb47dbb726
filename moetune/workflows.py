"""Library functions behind the inference-side CLI subcommands: eval, generate, merge, export."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataSection
from .data import build_datasets, eval_batches, resolve_tokenizer
from .errors import ConfigError
from .evaluation import RouterTally, TaskResult, evaluate_tasks
from .model import load_model
from .model.generate import SamplingConfig, generate
from .outputs import check_output
from .peft.io import load_adapter, merge_adapter, save_adapter


def default_tokenizer(model_path: str | os.PathLike, spec: str | None):
    """The given tokenizer, else the model folder's own, else the byte tokenizer (said in a warning).

    The same rule as ``data.tokenizer`` in a run: :func:`moetune.data.resolve_tokenizer`.
    """
    return resolve_tokenizer(spec, model_path)


def load_with_adapter(model_path, adapter: str | None, *, dtype=torch.float32, device="cpu", name: str = "default"):
    model = load_model(model_path, dtype=dtype, device=device)
    if adapter:
        load_adapter(model, adapter, name=name)
    return model.eval()


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    examples: int
    router: str = ""  # router statistics (base MoE layers, adapter mixtures)

    def summary(self) -> str:
        line = f"loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  ({self.tokens:,} scored tokens, {self.examples} examples)"
        return line + ("\n" + self.router if self.router else "")


@torch.no_grad()
def evaluate_file(model_path, data_file, *, adapter=None, tokenizer=None, max_length: int = 1024, batch_size: int = 8, train_on_prompt: bool = False) -> EvalResult:
    """Token-weighted loss and perplexity of base (or base + adapter) on a JSONL file."""
    tok = default_tokenizer(model_path, tokenizer)
    section = DataSection(train=str(data_file), max_length=max_length, train_on_prompt=train_on_prompt, tokenizer="byte")
    examples = build_datasets(section, tok).train
    model = load_with_adapter(model_path, adapter)
    total, count, tally = 0.0, 0, RouterTally()
    for batch in eval_batches(examples, batch_size=batch_size, pad_id=tok.pad_id):
        n = int((batch["labels"][:, 1:] != -100).sum())
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], position_ids=batch.get("position_ids"))
        total += out.loss.item() * n
        count += n
        tally.add(model, out, float(n))
    loss = total / max(count, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50)), tokens=count, examples=len(examples), router=tally.summary())


@torch.no_grad()
def evaluate_task_files(model_path, files: list[str], *, adapter=None, tokenizer=None, max_length: int = 1024,
                        batch_size: int = 8, chat: bool = False) -> list[TaskResult]:
    """Multiple-choice accuracy per task file (see :mod:`moetune.evaluation`)."""
    tok = default_tokenizer(model_path, tokenizer)
    model = load_with_adapter(model_path, adapter)
    return evaluate_tasks(model, tok, list(files), batch_size=batch_size, max_length=max_length, chat=chat)


def generate_text(model_path, prompts: list[str], *, adapter=None, tokenizer=None, chat: bool = True, sampling: SamplingConfig | None = None) -> list[str]:
    """Continue each prompt (as a user turn when ``chat``) and return the decoded text."""
    tok = default_tokenizer(model_path, tokenizer)
    model = load_with_adapter(model_path, adapter)
    if chat and tok.has_chat_template:
        ids = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True).ids for p in prompts]
    else:
        bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
        ids = [bos + tok.encode(p) for p in prompts]
    outs = generate(model, ids, eos_id=tok.eos_id, pad_id=tok.pad_id if tok.pad_id is not None else 0, config=sampling)
    return [tok.decode(o) for o in outs]


def merge_to_checkpoint(model_path, adapter, out_dir, *, overwrite: bool = False) -> Path:
    """Fold an adapter into the base and write a plain Hugging Face checkpoint."""
    inputs = (model_path, adapter)
    check_output(out_dir, "model", overwrite=overwrite, inputs=inputs)  # before minutes of loading
    model = load_with_adapter(model_path, adapter)
    merge_adapter(model, name="default")
    return model.save_pretrained(out_dir, overwrite=overwrite, inputs=inputs)


def export_adapter(model_path, adapter, out_dir, *, layout: str = "peft", overwrite: bool = False) -> Path:
    """Re-save an adapter in PEFT's layout or the per-expert (vLLM) layout."""
    check_output(out_dir, "adapter", overwrite=overwrite, inputs=(model_path, adapter))
    model = load_with_adapter(model_path, adapter)
    return Path(save_adapter(model, out_dir, name="default", layout=layout, overwrite=overwrite))
