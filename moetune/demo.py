"""``moetune demo``: the whole workflow on a tiny MoE, on CPU, in a few minutes, nothing downloaded.

1. Build a tiny Qwen3-MoE-shaped model and give it a base skill by training all its weights on
   built-in data: ``copy: <word>`` and ``lower: <word>`` (mixed-case words).
2. Save it as a Hugging Face checkpoint, the way a user's own base model arrives.
3. Show that it cannot do a new task, ``upper: <word>``, on held-out words.
4. LoRA-fine-tune it (attention + routed experts) with the regular trainer from a regular config,
   on ``upper:`` examples written as JSONL, exactly as ``moetune train`` would.
5. Reload base + saved adapter and measure the task accuracy again.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import TrainConfig, from_dict
from .data import ByteTokenizer, instruction_prompt, make_train_loader, tokenize_row
from .data.formats import InstructionRow
from .demo_data import make_rows, write_jsonl
from .model import build_random_model, load_model
from .model.generate import generate
from .outputs import open_folder
from .peft.formats.adapters import load_adapter
from .tiny_models import tiny_moe_args
from .train.trainer import train


def pretrain_base(model, tok: ByteTokenizer, rows: list[dict], *, steps: int, seed: int) -> float:
    """Full-parameter training of a tiny base, MoE or dense (the only non-LoRA training moetune does)."""
    examples = [tokenize_row(InstructionRow(**r), tok, max_length=64) for r in rows]
    loader = make_train_loader(examples, batch_size=32, max_length=64, packing=False, pad_id=tok.pad_id, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss = float("nan")
    for step, (batch, _) in zip(range(steps), loader.iter_from()):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss_t = out.loss if out.aux_loss is None else out.loss + 0.01 * out.aux_loss  # dense bases have no router
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
    return loss


def accuracy(model, tok: ByteTokenizer, rows: list[dict], adapter: str | None = None) -> float:
    model.eval()
    prompts = [instruction_prompt(tok, r["instruction"]) for r in rows]
    names = [adapter] * len(rows) if adapter else None
    outs = generate(model, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, adapter_names=names)
    return sum(tok.decode(o) == r["output"] for o, r in zip(outs, rows)) / len(rows)


def lora_config(out: Path, data: Path, eval_data: Path, steps: int) -> TrainConfig:
    """The same config a user would write in YAML (see examples/)."""
    raw = {
        "model": {"path": str(out / "base-model"), "dtype": "fp32", "device": "cpu"},
        "adapter": {
            "name": "upper",
            "r": 8,
            "alpha": 16,
            "dropout": 0.05,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
        },
        "data": {
            "train": str(data),
            "eval": str(eval_data),
            "format": "instruction",
            "tokenizer": "byte",
            "max_length": 64,
        },
        "optim": {
            "lr": 5e-3,
            "max_steps": steps,
            "batch_size": 32,
            "warmup_steps": 10,
            "lr_schedule": "cosine",
            "aux_loss_coef": 0.001,
        },
        "checkpoint": {"output_dir": str(out / "run"), "save_every": 0},
        "logging": {"eval_every": max(steps // 4, 1), "progress": True},
    }
    raw["adapters"] = [raw.pop("adapter")]
    return from_dict(TrainConfig, raw, where="demo config")


def claim_demo_folder(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The demo writes ``base-model/``, ``data/`` and ``run/`` into a folder of its own (new, empty,
    or an earlier demo's); a rerun replaces only those, never files someone else put there."""
    folder = open_folder(out_dir, "demo", overwrite=overwrite)
    for name in ("base-model", "data", "run"):
        folder.entry(name)
    return folder.path


def run_demo(
    out_dir: str | Path = "moetune-demo", *, quick: bool = False, seed: int = 0, overwrite: bool = False
) -> dict:
    """Run the demo; prints a report and returns the measured accuracies."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    out, tok = claim_demo_folder(out_dir, overwrite=overwrite), ByteTokenizer()
    base_steps, lora_steps = (500, 40) if quick else (1200, 100)
    print(f"[1/4] pre-training a tiny MoE (8 experts, top-2) on copy/lower for {base_steps} steps ...", flush=True)
    model = build_random_model(tiny_moe_args(272), seed=seed)
    base_loss = pretrain_base(model, tok, make_rows("base", 4000, seed), steps=base_steps, seed=seed)
    model.save_pretrained(out / "base-model")
    held_out = make_rows("upper", 100, seed + 2)
    print(f"      base loss {base_loss:.3f}; saved {out / 'base-model'}", flush=True)
    base_acc = accuracy(model, tok, held_out)
    print(f"[2/4] base model on 'upper: <word>' (held-out): {base_acc:.0%} exact match", flush=True)
    train_file = write_jsonl(make_rows("upper", 2000, seed + 1), out / "data" / "upper_train.jsonl")
    eval_file = write_jsonl(make_rows("upper", 64, seed + 3), out / "data" / "upper_eval.jsonl")
    print(f"[3/4] LoRA r=8 on attention + routed experts, {lora_steps} steps ...", flush=True)
    result = train(lora_config(out, train_file, eval_file, lora_steps), overwrite=True)  # run/ is the demo's
    adapted = load_model(out / "base-model")
    load_adapter(adapted, result.adapter_dirs["upper"], name="upper")
    adapted_acc = accuracy(adapted, tok, held_out)
    print(f"[4/4] base + adapter on the same held-out words: {adapted_acc:.0%} exact match")
    print()
    print(f"  task accuracy   base {base_acc:.0%}  ->  base + LoRA {adapted_acc:.0%}")
    print("  " + result.summary().replace("\n", "\n  "))
    print(f"  total time {time.perf_counter() - t0:.0f}s; everything is under {out}/")
    return {"base_accuracy": base_acc, "adapted_accuracy": adapted_acc, "adapter": str(result.adapter_dirs["upper"])}
