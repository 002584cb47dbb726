"""Merging study: two task adapters on a tiny MoE, merged by each method, accuracy per task.

1. A tiny Qwen3-MoE-shaped base (the demo's shape) is pre-trained on the demo's ``copy:`` /
   ``lower:`` rows plus a default: under an instruction it does not know, it echoes the input.
2. One LoRA per task is trained with the regular trainer (attention + routed experts): ``upper:
   <word>`` (the demo's task) and a second task, by default ``succ: <digits>`` (every digit + 1,
   mod 10). The base can do neither. Each adapter's data mixes in ``--replay`` rows of the base's
   own data, so it learns to act on its own instruction only.
3. ``moetune merge-adapters``' library function merges the two folders by each method.
4. Exact-match accuracy on held-out inputs of both tasks, for the base, each single adapter and
   each merge; "base" is the base's own skill on held-out base rows. One JSON line per model,
   then a table.

    python bench/merge_study.py                    # ~3 min on 2 free CPU cores
    python bench/merge_study.py --seed 1           # another base, other adapters
    python bench/merge_study.py --rank 8 --second swapcase --replay 0  # a harder setting
    python bench/merge_study.py --quick            # fewer steps (smoke test)

A folder that already holds the base and both adapters of the same setting (an earlier run) is
reused: only the merges and the evaluation run again. docs/adalora_merging.md has the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moetune.config import TrainConfig, from_dict
from moetune.data import ByteTokenizer
from moetune.demo import accuracy, pretrain_base
from moetune.demo_data import LETTERS, make_rows, write_jsonl
from moetune.tiny_models import tiny_moe_args
from moetune.model import build_random_model, load_model
from moetune.peft.core.layer import disable_adapters
from moetune.peft.formats.adapters import load_adapter
from moetune.peft.arithmetic.folders import combine_adapter_folders as merge_adapter_dirs
from moetune.train.trainer import train

ATTN_EXPERTS = ("q_proj", "k_proj", "v_proj", "o_proj", "experts")
DIGITS = "0123456789"
INSTRUCTION: dict[str, str] = {}  # task -> the instruction word its rows use (default: the task's name)
TASKS = ["upper", "succ"]  # the second task can be changed with --second


@dataclass(frozen=True)
class Setup:
    """How the base and the two task adapters are trained."""

    base_steps: int = 1200
    lora_steps: int = 200
    rank: int = 2  # alpha = 2 x rank
    lr: float = 5e-3
    targets: tuple[str, ...] = ATTN_EXPERTS
    replay: int = 2000  # rows of base data mixed into each task's 2000 rows
    hidden_size: int = 96
    eval_words: int = 100
    seed: int = 0

    def tag(self) -> str:
        """Names the adapters' folders, so runs of other settings never reuse them."""
        return f"r{self.rank}-lr{self.lr:g}-s{self.lora_steps}-replay{self.replay}-{'+'.join(self.targets)}"


def merges(rank: int) -> dict[str, dict]:
    """Merge label -> options; each runs with weights (1, 1) (task arithmetic: the task vectors
    add up) and (0.5, 0.5) (their mean). PEFT's ``linear`` / ``ties`` / ``dare_ties`` combine the
    A's and B's separately (cross terms B_1 A_2 appear); ``cat`` and the ``*_svd`` methods combine
    the deltas B_i A_i as the TIES/DARE papers do (``cat`` exactly: ranks stacked)."""
    return {
        "linear": {},
        "ties": {"density": 0.5},
        "dare_ties": {"density": 0.5},
        "cat": {},  # rank 2r: exactly the sum of both deltas
        "svd": {},  # rank r (PEFT's default): the summed delta truncated
        f"svd_r{2 * rank}": {"method": "svd", "rank": 2 * rank},  # the sum, re-factorised without loss
        "ties_svd": {"density": 0.5, "rank": 2 * rank},
        "ties_svd_d09": {"method": "ties_svd", "density": 0.9, "rank": 2 * rank},
        "dare_ties_svd": {"density": 0.5, "rank": 2 * rank},
        "dare_ties_svd_d09": {"method": "dare_ties_svd", "density": 0.9, "rank": 2 * rank},
    }


def _text(rng: random.Random, task: str) -> str:
    """An input for ``task``: digit strings for ``succ``, mixed-case words for ``swapcase``,
    lowercase words otherwise."""
    if task == "succ":
        return "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 7)))
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return "".join(c.upper() if rng.random() < 0.5 else c for c in word) if task == "swapcase" else word


ANSWER = {
    "upper": str.upper,
    "swapcase": str.swapcase,
    "reverse": lambda s: s[::-1],
    "succ": lambda s: "".join(str((int(d) + 1) % 10) for d in s),  # every digit + 1, mod 10
}


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    """``n`` rows ``{task}: <input>`` -> the task's answer."""
    rng = random.Random(seed)
    return [
        {"instruction": f"{INSTRUCTION.get(task, task)}: {x}", "output": ANSWER[task](x)}
        for x in (_text(rng, task) for _ in range(n))
    ]


def base_rows(n: int, seed: int) -> list[dict]:
    """The base's skills. Half are the demo's ``copy:`` / ``lower:`` on mixed-case words; the
    other half give the base a sane default, as a pretrained LLM has one: under an instruction it
    does not know (a random word, never a task's name), it echoes the input, letters or digits.
    Without that default the base answers unknown instructions with noise, which each adapter
    reshapes its own way, and the sum of two adapters is noise again."""
    rng = random.Random(seed)
    rows = make_rows("base", n - n // 2, seed)
    for _ in range(n // 2):
        name = _text(rng, "upper")
        while name in ANSWER or name in ("copy", "lower", *INSTRUCTION.values()):
            name = _text(rng, "upper")
        x = _text(rng, rng.choice(["succ", "swapcase"]))
        rows.append({"instruction": f"{name}: {x}", "output": x})
    rng.shuffle(rows)
    return rows


def lora_run(setup: Setup, base: Path, data: Path, out: Path, name: str) -> Path:
    raw = {
        "model": {"path": str(base), "device": "cpu"},
        "adapters": [
            {
                "name": name,
                "r": setup.rank,
                "alpha": 2 * setup.rank,
                "dropout": 0.05,
                "target_modules": list(setup.targets),
            }
        ],
        "data": {"train": str(data), "format": "instruction", "tokenizer": "byte", "max_length": 64},
        "optim": {
            "lr": setup.lr,
            "max_steps": setup.lora_steps,
            "batch_size": 32,
            "warmup_steps": 10,
            "aux_loss_coef": 0.001,
        },
        "checkpoint": {"output_dir": str(out), "save_every": 0},
        "logging": {"progress": False},
        "seed": setup.seed,
    }
    return train(from_dict(TrainConfig, raw, where="merge study")).adapter_dirs[name]


def prepare(out: Path, setup: Setup, log=print) -> dict[str, Path]:
    """The base (saved under ``out/base-model``) and one adapter per task; reused when present."""
    t0, seed = time.perf_counter(), setup.seed
    torch.manual_seed(seed)
    if not (out / "base-model" / "config.json").is_file():
        model = build_random_model(tiny_moe_args(272, setup.hidden_size), seed=seed)
        pretrain_base(model, ByteTokenizer(), base_rows(4000, seed), steps=setup.base_steps, seed=seed)
        model.save_pretrained(out / "base-model")
    adapters = {}
    for i, task in enumerate(TASKS):
        run = out / f"run-{task}-{setup.tag()}"
        adapters[task] = run / "adapter"
        if not (adapters[task] / "adapter_config.json").is_file():
            rows = task_rows(task, 2000, seed + 10 + i) + base_rows(setup.replay, seed + 20 + i)
            random.Random(seed + i).shuffle(rows)
            data = write_jsonl(rows, out / "data" / f"{task}-{setup.tag()}.jsonl")
            adapters[task] = lora_run(setup, out / "base-model", data, run, task)
        log(f"'{task}' adapter ready ({time.perf_counter() - t0:.0f}s)")
    return adapters


def run_study(
    out: Path,
    setup: Setup = Setup(),
    *,
    methods: dict[str, dict] | None = None,
    weights: tuple[float, ...] = (1.0, 0.5),
    log=print,
) -> dict[str, dict[str, float]]:
    """Train, merge, evaluate; returns ``{model: {task: accuracy}}`` (model: base, a task, a merge)."""
    t0 = time.perf_counter()
    adapters = prepare(out, setup, log)
    merged = {}
    for label, options in (merges(setup.rank) if methods is None else methods).items():
        opts = dict(options)
        method = opts.pop("method", label)
        for w in weights:
            name = f"{label}_w{w:g}".replace(".", "")  # adapter names: no dots (w0.5 -> w05)
            folder = out / f"merged-{name}-{setup.tag()}"
            merged[name] = merge_adapter_dirs(
                out / "base-model", [adapters[t] for t in TASKS], folder, method=method, weights=[w, w], **opts
            ).out_dir
    evaluated, tok = load_model(out / "base-model"), ByteTokenizer()
    for name, folder in {**adapters, **merged}.items():
        load_adapter(evaluated, folder, name=name)
    held_out = {task: task_rows(task, setup.eval_words, setup.seed + 100 + i) for i, task in enumerate(TASKS)}
    held_out["base"] = base_rows(setup.eval_words, setup.seed + 200)  # the base's own skill
    results = {}
    for name in ["base", *adapters, *merged]:
        with disable_adapters(evaluated) if name == "base" else contextlib.nullcontext():
            adapter = None if name == "base" else name  # a named adapter runs alone (per-sample selection)
            results[name] = {task: accuracy(evaluated, tok, rows, adapter=adapter) for task, rows in held_out.items()}
        log(json.dumps({"model": name, **results[name]}))
    log(f"total {time.perf_counter() - t0:.0f}s")
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: accuracy per task, their mean, and the base's own skill (copy, lower, echo)."""
    lines = [f"| model | {' | '.join(TASKS)} | mean | base skill |", "|---|" + "---:|" * (len(TASKS) + 2)]
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
    parser.add_argument("--second", choices=["succ", "swapcase", "reverse"], default="succ", help="the second task")
    parser.add_argument(
        "--replay", type=int, default=Setup.replay, help="rows of base data mixed into each task's data"
    )
    parser.add_argument("--rank", type=int, default=Setup.rank, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--lr", type=float, default=Setup.lr, help="LoRA learning rate")
    parser.add_argument("--lora-steps", type=int, default=Setup.lora_steps)
    parser.add_argument("--targets", default=",".join(ATTN_EXPERTS), help="comma-separated LoRA target_modules")
    parser.add_argument("--hidden-size", type=int, default=Setup.hidden_size, help="the base's width")
    parser.add_argument("--shared-instruction", help="one instruction word for both tasks (told apart by their inputs)")
    ns = parser.parse_args(argv)
    TASKS[1] = ns.second
    if ns.shared_instruction:
        INSTRUCTION.update({t: ns.shared_instruction for t in TASKS})
    torch.set_num_threads(min(2, torch.get_num_threads()))
    quick = dict(base_steps=400, lora_steps=40, eval_words=40) if ns.quick else {"lora_steps": ns.lora_steps}
    setup = Setup(
        seed=ns.seed,
        replay=ns.replay,
        rank=ns.rank,
        lr=ns.lr,
        targets=tuple(ns.targets.split(",")),
        hidden_size=ns.hidden_size,
        **quick,
    )
    print(table(run_study(Path(ns.out), setup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
