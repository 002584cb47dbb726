"""What a run reports: one ``metrics.jsonl`` record per step, and the :class:`TrainResult` at the end.

A one-job run logs the job's numbers at the top level (``loss``, ``aux_loss``, ``grad_norm``, ``lr``,
``tokens``, ``skipped``, router load and entropy, mixture statistics); a run of several jobs logs the
mean loss, the tokens of all jobs and, under ``adapters``, each job's own record.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..peft.mixtures.stats import mixture_metrics


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dirs: dict[str, Path]
    steps: int
    tokens: int
    seconds: float
    peak_memory_gib: float
    final_loss: float | None
    eval_loss: float | None
    skipped_steps: int
    plot: Path | None
    losses: list[float] = field(default_factory=list)
    objective: str = "sft"  # a preference objective's loss has no perplexity

    def summary(self) -> str:
        lines = [
            f"trained {self.steps} steps, {self.tokens:,} tokens in {self.seconds:.1f}s "
            f"({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s), peak memory {self.peak_memory_gib:.2f} GiB",
            f"final train loss {self.final_loss:.4f}"
            + (
                f", eval loss {self.eval_loss:.4f}"
                + (f" (perplexity {math.exp(min(self.eval_loss, 50)):.2f})" if self.objective == "sft" else "")
                if self.eval_loss is not None
                else ""
            ),
        ]
        if self.skipped_steps:
            lines.append(f"skipped {self.skipped_steps} step(s) with non-finite loss or gradients")
        lines += [f"adapter '{n}': {p}" for n, p in self.adapter_dirs.items()]
        if self.plot:
            lines.append(f"loss plot: {self.plot}")
        return "\n".join(lines)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def job_mixture(model, records: dict, name: str) -> dict:
    """Job ``name``'s mixture-adapter statistics (load, entropy per router), for its record."""
    metrics = mixture_metrics(model, {k: r for k, r in records.items() if getattr(r, "adapter", None) == name})
    return {"mixture": metrics[name]} if name in metrics else {}


def step_record(
    step: int,
    per_job: dict[str, dict],
    *,
    together: bool,
    model,
    records: dict,
    router: dict,
    seconds: float,
    elapsed: float,
) -> dict:
    """The metrics record of loop step ``step`` from each job's record (``per_job``); ``router``: the
    routers' load and entropy (last micro-batch), ``records``: what the adapter layers reported."""
    if together:
        tokens = sum(r["tokens"] for r in per_job.values())
        return {
            "step": step,
            "loss": sum(r["loss"] for r in per_job.values()) / len(per_job),
            "lr": next(iter(per_job.values()))["lr"],
            "tokens": tokens,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "elapsed_s": round(elapsed, 3),
            "adapters": per_job,
            **router,
        }
    job = next(iter(per_job.values()))
    record = {
        "step": step,
        **{k: job[k] for k in ("loss", "aux_loss", "grad_norm", "lr", "tokens", "skipped")},
        **job.get("preference", {}),
        **router,
    }
    mixture = mixture_metrics(model, records)
    if mixture:
        record.update(router_loss=job["router_loss"], mixture=mixture)
    return {**record, "tokens_per_s": job["tokens"] / max(seconds, 1e-9), "elapsed_s": round(elapsed, 3)}


def losses_of(records: list[dict], names: list[str], *, together: bool) -> dict[str, list[float]]:
    """Each job's logged losses of the steps it did not skip."""
    if not together:
        return {names[0]: [r["loss"] for r in records if "loss" in r and not r.get("skipped")]}
    return {
        n: [r["adapters"][n]["loss"] for r in records if n in r.get("adapters", {}) and not r["adapters"][n]["skipped"]]
        for n in names
    }
