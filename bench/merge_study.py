"""Merging study: two task adapters on the demo's tiny MoE, merged by each method, accuracy per task.

1. The demo's base (tiny Qwen3-MoE shape, pre-trained on ``copy:`` / ``lower:``) is built and saved.
2. One LoRA per task is trained with the regular trainer (r=8 on q, k, v, o and the routed
   experts): ``upper: <word>`` (the demo's task) and ``swapcase: <MiXeD>`` (every letter's case
   flipped). The base can do neither. With ``--replay N`` each adapter also sees N rows of the
   base's own tasks (copy/lower), so it learns to act on its own instruction only.
3. ``moetune merge-adapters``' library function merges the two folders by each method.
4. Exact-match accuracy on held-out words of both tasks, for the base, each single adapter and
   each merge. One JSON line per model, then a table.

    python bench/merge_study.py                # ~5 min on 2 free CPU cores
    python bench/merge_study.py --replay 1000  # adapters trained with base-task replay
    python bench/merge_study.py --quick        # fewer steps (smoke test)

A folder that already holds the base and both adapters (an earlier run) is reused: only the
merges and the evaluation run again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch

from moetune.config import TrainConfig, from_dict
from moetune.data import ByteTokenizer
from moetune.demo import LETTERS, accuracy, make_rows, pretrain_base, tiny_moe_args, write_jsonl
from moetune.model import build_random_model, load_model
from moetune.peft.base import disable_adapters
from moetune.peft.io import load_adapter
from moetune.peft.merge_files import merge_adapter_dirs
from moetune.train.trainer import train

TASKS = ["upper", "swapcase"]  # the second task can be changed with --second
# method -> extra options; each runs with weights (1, 1) (task arithmetic: the task vectors add
# up) and (0.5, 0.5) (their mean).
# PEFT's defaults combine the A's and B's separately (cross terms B_1 A_2 appear); the *_svd
# variants combine the deltas B_i A_i as the TIES/DARE papers do, then re-factorise to rank 8.
MERGES = {
    "linear": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "svd": {},  # rank 8 (the inputs' rank): the summed delta truncated
    "svd_r16": {"method": "svd", "rank": 16},  # rank 16: exactly the sum of both deltas
    "ties_svd": {"density": 0.5},
    "dare_ties_svd": {"density": 0.5},
}


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    """``upper`` from the demo; ``swapcase``: mixed-case words, every letter's case flipped;
    ``reverse``: lowercase words, letters in reverse order."""
    if task == "upper":
        return make_rows("upper", n, seed)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
        if task == "swapcase":
            word = "".join(c.upper() if rng.random() < 0.5 else c for c in word)
        rows.append({"instruction": f"{task}: {word}", "output": word.swapcase() if task == "swapcase" else word[::-1]})
    return rows


def lora_run(base: Path, data: Path, out: Path, name: str, steps: int, seed: int) -> Path:
    raw = {
        "model": {"path": str(base), "device": "cpu"},
        "adapters": [{"name": name, "r": 8, "alpha": 16, "dropout": 0.05,
                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]}],
        "data": {"train": str(data), "format": "instruction", "tokenizer": "byte", "max_length": 64},
        "optim": {"lr": 5e-3, "max_steps": steps, "batch_size": 32, "warmup_steps": 10, "aux_loss_coef": 0.001},
        "checkpoint": {"output_dir": str(out), "save_every": 0},
        "logging": {"progress": False},
        "seed": seed,
    }
    return train(from_dict(TrainConfig, raw, where="merge study")).adapter_dirs[name]


def run_study(out: Path, *, base_steps: int = 1200, lora_steps: int = 100, eval_words: int = 100,
              seed: int = 0, merges: dict | None = None, weights: tuple[float, ...] = (1.0, 0.5),
              replay: int = 0, log=print) -> dict[str, dict[str, float]]:
    """Train, merge, evaluate; returns ``{model: {task: accuracy}}`` (model: base, a task, a merge)."""
    t0 = time.perf_counter()
    tok = ByteTokenizer()
    torch.manual_seed(seed)
    if not (out / "base-model" / "config.json").is_file():  # a finished earlier run is reused
        model = build_random_model(tiny_moe_args(272), seed=seed)
        pretrain_base(model, tok, make_rows("base", 4000, seed), steps=base_steps, seed=seed)
        model.save_pretrained(out / "base-model")
    adapters = {}
    tag = f"-replay{replay}" if replay else ""
    for i, task in enumerate(TASKS):
        adapters[task] = out / f"run-{task}{tag}" / "adapter"
        if not (adapters[task] / "adapter_config.json").is_file():
            rows = task_rows(task, 2000, seed + 10 + i) + make_rows("base", replay, seed + 20 + i)
            random.Random(seed + i).shuffle(rows)
            data = write_jsonl(rows, out / "data" / f"{task}{tag}.jsonl")
            adapters[task] = lora_run(out / "base-model", data, out / f"run-{task}{tag}", task, lora_steps, seed)
        log(f"'{task}' adapter ready ({time.perf_counter() - t0:.0f}s)")
    merged = {}
    for label, options in (merges if merges is not None else MERGES).items():
        opts = dict(options)
        method = opts.pop("method", label)
        for w in weights:
            name = f"{label}_w{w:g}".replace(".", "")  # adapter names: no dots (w0.5 -> w05)
            merged[name] = merge_adapter_dirs(out / "base-model", [adapters[t] for t in TASKS], out / f"merged-{name}{tag}",
                                              method=method, weights=[w, w], **opts).out_dir
    evaluated = load_model(out / "base-model")
    for name, folder in {**adapters, **merged}.items():
        load_adapter(evaluated, folder, name=name)
    held_out = {task: task_rows(task, eval_words, seed + 100 + i) for i, task in enumerate(TASKS)}
    held_out["base"] = make_rows("base", eval_words, seed + 200)  # the base's own copy/lower skill
    results = {}
    for name in ["base", *adapters, *merged]:
        with disable_adapters(evaluated) if name == "base" else contextlib.nullcontext():
            adapter = None if name == "base" else name  # a named adapter runs alone (per-sample selection)
            results[name] = {task: accuracy(evaluated, tok, rows, adapter=adapter) for task, rows in held_out.items()}
        log(json.dumps({"model": name, **results[name]}))
    log(f"total {time.perf_counter() - t0:.0f}s")
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: accuracy per task, their mean, and the base's copy/lower skill."""
    lines = [f"| model | {' | '.join(TASKS)} | mean | copy/lower |", "|---|" + "---:|" * (len(TASKS) + 2)]
    for name, accs in results.items():
        cells = [f"{accs[t]:.0%}" for t in TASKS]
        mean = sum(accs[t] for t in TASKS) / len(TASKS)
        lines.append(f"| {name} | {' | '.join(cells)} | {mean:.0%} | {accs['base']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="merge-study", help="work folder (default ./merge-study)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and words (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--second", choices=["swapcase", "reverse"], default="swapcase", help="the second task")
    parser.add_argument("--replay", type=int, default=0, help="rows of the base's copy/lower data mixed into each task's data")
    ns = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    steps = dict(base_steps=400, lora_steps=40, eval_words=40) if ns.quick else {}
    TASKS[1] = ns.second
    results = run_study(Path(ns.out), seed=ns.seed, replay=ns.replay, **steps)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
