"""Several adapters trained together (one batch, ``adapter_names`` per sample) vs one after another.

A moetune MoE model (Qwen3-MoE layout, random weights) carries ``--adapters`` LoRA adapters (r=16 on
q, k, v, o and all routed experts, B non-zero so every adapter changes the output). Each adapter
has its own micro-batch of ``--batch`` x ``--tokens``. One *together* step is one forward + backward
on all adapters' samples at once (each sample names its adapter; the loss is the sum of each
adapter's mean token loss, as the trainer's) and one optimizer step per adapter; one *apart* step
is, for each adapter in turn, a forward + backward on its own micro-batch with only that adapter
active, and its optimizer step. Both do the same work for the adapters; the pairs alternate
(together, apart, apart, together, ...) so that whatever else the machine runs falls on both.

``OMP_WAIT_POLICY`` is PASSIVE unless the environment sets it (see ``bench/cpu_grid.py``: PASSIVE
adds ~100 us to every parallel op, which favours the together step, the one with fewer ops; ACTIVE
is what a process that sets nothing gets between ops).

Prints one JSON line: each mode's [median, min, max] seconds per step, by the wall clock and by
the process's CPU time, the throughput ratio of each (apart time / together time: > 1 means
training together is faster), and the largest difference between an adapter's loss in the
together forward and alone (same weights, before any step); also each mode's median minor page
faults per step (see :func:`timed`).

    python bench/multi_adapter.py                        # hidden 512, 32 experts top-4, 4 x 2 x 256 tokens
    python bench/multi_adapter.py --tiny --steps 2       # smoke test (seconds)
    python bench/multi_adapter.py --device cuda --dtype bfloat16 --hidden 2048 --experts 64 --top-k 8 --tokens 1024
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads make shared-CPU timings erratic

import argparse  # noqa: E402 - after the OpenMP setting, which must precede torch
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import moetune  # noqa: E402
from moetune.model import build_random_model, model_args_from_hf  # noqa: E402
from moetune.model.loss import sample_losses  # noqa: E402


def model_config(ns) -> dict:
    hidden = ns.hidden
    return dict(
        model_type="qwen3_moe",
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64 if hidden >= 64 else hidden,
        num_hidden_layers=ns.layers,
        num_experts=ns.experts,
        num_experts_per_tok=ns.top_k,
        moe_intermediate_size=hidden // 2,
        intermediate_size=2 * hidden,
        vocab_size=ns.vocab,
        max_position_embeddings=max(4096, ns.tokens),
        norm_topk_prob=True,
    )


def build(ns):
    model = build_random_model(model_args_from_hf(model_config(ns), where="bench"), dtype=getattr(torch, ns.dtype))
    model.to(ns.device)
    names = [f"a{i}" for i in range(ns.adapters)]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["experts"] if not ns.attention_only else [])
    for name in names:
        moetune.add_adapter(model, moetune.LoraConfig(r=ns.rank, alpha=2 * ns.rank, target_modules=targets), name=name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.requires_grad and "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 1e-2)
    model.train()
    opts = {
        n: torch.optim.AdamW([p for k, p in model.named_parameters() if p.requires_grad and k.endswith(n)], lr=1e-5)
        for n in names
    }
    batches = {n: torch.randint(0, ns.vocab, (ns.batch, ns.tokens), generator=gen).to(ns.device) for n in names}
    return model, names, opts, batches


def together_losses(model, names, batches) -> tuple[dict[str, torch.Tensor], object]:
    ids = torch.cat([batches[n] for n in names])
    out = model(ids, labels=ids, adapter_names=[n for n in names for _ in range(batches[n].shape[0])])
    sums, start, losses = sample_losses(out.token_loss), 0, {}
    for n in names:
        b = batches[n].shape[0]
        losses[n] = sums[start : start + b].sum() / (b * (batches[n].shape[1] - 1))  # labels shift: T-1 counted
        start += b
    return losses, out


def together_step(model, names, opts, batches) -> None:
    losses, _ = together_losses(model, names, batches)
    sum(losses.values()).backward()
    for n in names:
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)


def apart_step(model, names, opts, batches) -> None:
    for n in names:
        moetune.set_adapter(model, n)
        out = model(batches[n], labels=batches[n])
        out.loss.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)


def timed(step, *args) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, minor page faults) of one step. On a loaded
    machine the CPU time is the steadier clock (waiting for a core does not count). Page faults:
    glibc's malloc hands large blocks back to the system when freed, so a step whose tensors are
    larger (all adapters' samples at once) touches fresh pages every step, which the CPU pays in
    the first op that writes them; a caching allocator (CUDA's) does not. On a GPU the wall clock
    is the figure (the step is timed from an idle stream to an idle stream)."""
    _wait_for_device()
    w, c, f = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(*args)
    _wait_for_device()
    return time.perf_counter() - w, time.process_time() - c, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f


def _wait_for_device() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def loss_difference(model, names, batches) -> float:
    """Largest |loss together - loss alone| over the adapters, same weights, no step taken."""
    with torch.no_grad():
        together, _ = together_losses(model, names, batches)
        worst = 0.0
        for n in names:
            moetune.set_adapter(model, n)
            alone = model(batches[n], labels=batches[n]).loss
            worst = max(worst, abs(float(together[n]) - float(alone)))
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="samples per adapter")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention-only", action="store_true")
    p.add_argument("--steps", type=int, default=7, help="timed steps per mode (median of these)")
    p.add_argument("--tiny", action="store_true", help="toy size, for a smoke test")
    ns = p.parse_args(argv)
    if ns.tiny:
        ns.hidden, ns.experts, ns.top_k, ns.vocab, ns.tokens, ns.rank = 64, 8, 2, 512, 32, 4
    model, names, opts, batches = build(ns)
    diff = loss_difference(model, names, batches)
    times: dict[str, list[tuple[float, float, float]]] = {"together": [], "apart": []}
    for i in range(ns.steps + 1):  # the first pair warms up
        order = ("together", "apart") if i % 2 == 0 else ("apart", "together")
        for mode in order:
            sec = timed(together_step if mode == "together" else apart_step, model, names, opts, batches)
            if i:
                times[mode].append(sec)
    row = {k: v for k, v in vars(ns).items() if k not in ("tiny", "steps")}
    for j, clock in enumerate(("wall", "cpu")):
        for mode, v in times.items():
            t = [s[j] for s in v]
            row[f"{mode}_{clock}_s"] = [round(statistics.median(t), 3), round(min(t), 3), round(max(t), 3)]
        med = {mode: statistics.median(s[j] for s in v) for mode, v in times.items()}
        row[f"throughput_ratio_{clock}"] = round(med["apart"] / med["together"], 3)
    row.update({f"{mode}_page_faults": int(statistics.median(s[2] for s in v)) for mode, v in times.items()})
    row["max_loss_diff"] = diff
    row.update(steps=ns.steps, threads=torch.get_num_threads(), torch=torch.__version__)
    row["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
