"""CPU step-time ratio grid: transformers + PEFT time / moetune time, interleaved in one process.

For every point of the grid (experts x tokens x LoRA case x dtype) both tools get the same base
and adapter weights (``bench/train_step.py``'s ``build_pair`` / ``add_adapters``), then their
training steps (forward, loss, backward, AdamW) alternate A, B, A, B ... so that whatever else the
machine does falls on both; the first step of each is a warm-up. Prints one JSON line per point:
each tool's median step and its spread (min, max), and the ratio of medians (> 1: moetune faster).

Timings mean something only on a quiet machine: no other jobs, threads pinned (``taskset``),
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (set here before torch loads; spinning
threads of two processes made 2-thread steps 3-10x slower and erratic). Report the spread with the
ratio. PASSIVE puts OpenMP's threads to sleep after every parallel op, and waking them cost ~100 us
per op here: at this hidden size it doubles both tools' steps and weighs most on whichever runs
more (smaller) ops. A process that does not set the policy spins between ops, as ACTIVE does; on a
quiet machine ``OMP_WAIT_POLICY=ACTIVE taskset -c 0,1 python bench/cpu_grid.py`` times that.

    taskset -c 0,1 python bench/cpu_grid.py                        # the whole grid (long)
    python bench/cpu_grid.py --experts 8 --tokens 512 --steps 3     # one point
    python bench/cpu_grid.py --by-dtype --experts 64 --tokens 2048 --cases attention+experts
        # each tool's bf16 step over its own fp32 step (bf16 on CPU should be no slower)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 - after the OpenMP setting, which must precede torch
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import CASES, add_adapters, build_pair  # noqa: E402 - the bench folder's own module


def grid_config(experts: int, hidden: int, layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        num_experts=experts,
        num_experts_per_tok=min(8, experts),
        moe_intermediate_size=hidden // 2,
        intermediate_size=2 * hidden,
        vocab_size=8192,
        num_hidden_layers=layers,
        norm_topk_prob=True,
    )


def one_step(model, opt, ids, ours: bool) -> float:
    t0 = time.perf_counter()
    out = model(ids, labels=ids) if ours else model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def interleaved(tools: dict[str, tuple], ids: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """tool -> (model, is moetune): each tool's step times, A, B, ... then ... B, A, after one warm-up each."""
    trainable = {t: [p for p in m.parameters() if p.requires_grad] for t, (m, _) in tools.items()}
    opts = {t: torch.optim.AdamW(params, lr=1e-5) for t, params in trainable.items()}
    times: dict[str, list[float]] = {t: [] for t in tools}
    for i in range(steps + 1):
        for tool, (model, ours) in list(tools.items())[:: 1 if i % 2 == 0 else -1]:
            sec = one_step(model, opts[tool], ids, ours)
            if i:
                times[tool].append(sec)
    return times


def spreads(times: dict[str, list[float]]) -> dict[str, dict]:
    ms = {"median_ms": statistics.median, "min_ms": min, "max_ms": max}
    return {t: {k: round(f(v) * 1e3, 1) for k, f in ms.items()} for t, v in times.items()}


def tool_pair(experts: int, case: str, dtype: torch.dtype, ns) -> dict[str, tuple]:
    """moetune and transformers + PEFT with the same base and adapter weights."""
    cfg = grid_config(experts, ns.hidden, ns.layers)
    hf, ours = build_pair(cfg, dtype, "cpu")
    if hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation("grouped_mm")
    with tempfile.TemporaryDirectory() as tmp:
        peft_model = add_adapters(hf, ours, CASES[case], tmp)
    ours.train(), peft_model.train()
    return {"moetune": (ours, True), "transformers+peft": (peft_model, False)}


def _ids(tokens: int, ns) -> torch.Tensor:
    vocab = grid_config(8, ns.hidden, ns.layers).vocab_size
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))


def point(experts: int, tokens: int, case: str, dtype: torch.dtype, ns) -> dict:
    times = interleaved(tool_pair(experts, case, dtype, ns), _ids(tokens, ns), ns.steps)
    med = {t: statistics.median(v) for t, v in times.items()}
    row = {"experts": experts, "tokens": tokens, "case": case, "dtype": str(dtype).removeprefix("torch.")}
    row |= spreads(times)
    row["ratio"] = round(med["transformers+peft"] / med["moetune"], 3)
    row.update(threads=torch.get_num_threads(), omp_wait_policy=os.environ["OMP_WAIT_POLICY"], torch=torch.__version__)
    return row


def dtype_point(experts: int, tokens: int, case: str, ns) -> dict:
    """Each tool's bf16 step against its own fp32 step at one shape, all four interleaved."""
    tools = {}
    for dtype in (torch.float32, torch.bfloat16):
        pair = tool_pair(experts, case, dtype, ns)
        tools |= {f"{t} {str(dtype).removeprefix('torch.')}": v for t, v in pair.items() if t in ns.tools}
    times = interleaved(tools, _ids(tokens, ns), ns.steps)
    med = {t: statistics.median(v) for t, v in times.items()}
    row = {"experts": experts, "tokens": tokens, "case": case} | spreads(times)
    row["bf16_over_fp32"] = {t: round(med[f"{t} bfloat16"] / med[f"{t} float32"], 3) for t in ns.tools}
    row.update(threads=torch.get_num_threads(), omp_wait_policy=os.environ["OMP_WAIT_POLICY"], torch=torch.__version__)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="8,32,64,128")
    p.add_argument("--tokens", default="512,1024,2048,4096")
    p.add_argument("--cases", default="attention,attention+experts")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=5, help="timed steps per tool (median of these)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--by-dtype", action="store_true", help="each tool's bf16 step over its fp32 step instead")
    p.add_argument("--tools", default="moetune,transformers+peft", help="with --by-dtype: the tools timed")
    ns = p.parse_args(argv)
    ns.tools = ns.tools.split(",")
    if ns.by_dtype:
        for case in ns.cases.split(","):
            for experts in map(int, ns.experts.split(",")):
                for tokens in map(int, ns.tokens.split(",")):
                    print(json.dumps(dtype_point(experts, tokens, case, ns)), flush=True)
        return 0
    for dtype in ns.dtypes.split(","):
        for case in ns.cases.split(","):
            for experts in map(int, ns.experts.split(",")):
                for tokens in map(int, ns.tokens.split(",")):
                    print(json.dumps(point(experts, tokens, case, getattr(torch, dtype), ns)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
