"""MixLoRA next to LoRA on the demo task, trained together in one run (``moetune demo --mixlora``).

The demo task (``upper: <word>`` on a base that knows ``copy:`` and ``lower:``, see
:mod:`moetune.demo`) on a tiny *dense* Qwen3-shaped base, since MixLoRA turns a dense FFN into a
mixture. Two adapters with about the same number of trainable parameters are trained at once by
the multi-adapter trainer, each sample through its own adapter:

- ``lora``: r=8 on q, k, v, o, gate, up, down;
- ``mixlora``: r=8 on q, k, v, o and, on the FFN, 4 LoRA experts of rank 2 on gate/up/down with a
  top-2 router (``router_aux_loss_coef`` 0.01).

Then both are reloaded from their folders and their held-out exact-match accuracy is measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import TrainConfig, from_dict
from .data import ByteTokenizer
from .demo import accuracy, claim_demo_folder, pretrain_base
from .demo_data import make_rows, write_jsonl
from .model import build_random_model, load_model
from .peft.core.params import trainable_parameters
from .peft.formats.adapters import load_adapter
from .tiny_models import tiny_model_args
from .train.trainer import train

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


def comparison_config(out: Path, data: Path, steps: int, batch_size: int = 32) -> TrainConfig:
    adapters = [
        {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ATTENTION + FFN},
        {
            "name": "mixlora",
            "method": "mixlora",
            "r": 8,
            "alpha": 16,
            "dropout": 0.05,
            "target_modules": ATTENTION + FFN,
            "mixture": {"num_experts": 4, "top_k": 2, "expert_r": 2, "expert_alpha": 4, "router_aux_loss_coef": 0.01},
        },
    ]
    raw = {
        "model": {"path": str(out / "base-model"), "dtype": "fp32", "device": "cpu"},
        "adapters": adapters,
        "data": {"train": str(data), "format": "instruction", "tokenizer": "byte", "max_length": 64},
        "optim": {
            "lr": 5e-3,
            "max_steps": steps,
            "batch_size": batch_size,
            "warmup_steps": max(steps // 20, 1),
            "lr_schedule": "cosine",
        },
        "checkpoint": {"output_dir": str(out / "run"), "save_every": 0},
        "logging": {"progress": False},
    }
    return from_dict(TrainConfig, raw, where="mixlora demo config")


def run_comparison(
    out_dir: str | Path = "moetune-mixlora-demo",
    *,
    base_steps: int = 600,
    steps: int = 150,
    seed: int = 0,
    held_out: int = 100,
    verbose: bool = True,
    overwrite: bool = False,
) -> dict:
    """Pre-train the dense base, train LoRA and MixLoRA together, return their accuracies and sizes."""
    say = print if verbose else (lambda *_a, **_k: None)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    out, tok = claim_demo_folder(out_dir, overwrite=overwrite), ByteTokenizer()
    model = build_random_model(tiny_model_args("qwen3", 272), seed=seed)
    base_loss = pretrain_base(model, tok, make_rows("base", 4000, seed), steps=base_steps, seed=seed)
    model.save_pretrained(out / "base-model")
    rows = make_rows("upper", held_out, seed + 2)
    result = {"base_loss": base_loss, "base_accuracy": accuracy(model, tok, rows)}
    say(f"dense base: loss {base_loss:.3f}, 'upper:' accuracy {result['base_accuracy']:.0%}", flush=True)
    data = write_jsonl(make_rows("upper", 2000, seed + 1), out / "data" / "upper_train.jsonl")
    trained = train(comparison_config(out, data, steps), overwrite=True)  # run/ is the demo's
    for name, folder in trained.adapter_dirs.items():
        adapted = load_model(out / "base-model")
        load_adapter(adapted, folder, name=name)
        result[f"{name}_params"] = sum(p.numel() for p in trainable_parameters(adapted, name).values())
        result[f"{name}_accuracy"] = accuracy(adapted, tok, rows, adapter=name)
        say(
            f"{name}: {result[f'{name}_params']:,} trainable parameters, held-out accuracy "
            f"{result[f'{name}_accuracy']:.0%}",
            flush=True,
        )
    result["seconds"] = time.perf_counter() - t0
    return result
