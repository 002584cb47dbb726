"""Evaluation during training: a job's mean eval loss, and the evaluations due after a step.

With a preference objective the eval loss is the objective's mean over the eval examples, and the
reward metrics of those examples (``eval_reward_accuracy``, ...) go into the record beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

from ..data.preference import preference_batches
from .jobs import BATCH_KEYS, Job
from .parallel import Parallel
from .preference import METRICS, PreferenceObjective, metric_means, metric_sums


@dataclass
class Evaluator:
    """What evaluating a job needs from the run (several jobs: each sample names its adapter)."""

    model: nn.Module
    parallel: Parallel
    device: torch.device
    autocast: Callable[[], ContextManager]
    pad_id: int
    together: bool
    preference: PreferenceObjective | None = None
    extra: dict = field(default_factory=dict)  # the last preference evaluation's metrics

    @torch.no_grad()
    def loss(self, job: Job) -> float | None:
        """Mean eval loss of ``job``'s eval data over its counted tokens (all ranks)."""
        if not job.data.eval:
            return None
        if self.preference is not None:
            return self.preference_loss(job)
        self.model.eval()
        total, count = 0.0, 0
        for batch, counts in self.parallel.eval_batches(
            job.data.eval, batch_size=job.optim.batch_size, pad_id=self.pad_id
        ):
            batch = {k: batch[k].to(self.device) for k in BATCH_KEYS if k in batch}
            n = int((batch["labels"][:, 1:] != -100).sum()) if counts else 0
            names = {"adapter_names": [job.name] * batch["input_ids"].shape[0]} if self.together else {}
            with self.autocast():
                total += self.model(**batch, **names).loss.item() * n
            count += n
        total, count = self.parallel.sum_floats(total, count)
        self.model.train()
        return total / max(count, 1)

    @torch.no_grad()
    def preference_loss(self, job: Job) -> float:
        """The preference objective's mean over ``job``'s eval examples (all ranks); its reward
        metrics go to :attr:`extra`."""
        self.model.eval()
        total, count, sums = 0.0, 0, dict.fromkeys(METRICS, 0.0)
        for batch, counts in self.preference_batches(job):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                scored = self.preference.score(batch, train=False)
            if not counts:
                continue
            total, count = total + float(scored.losses.sum()), count + scored.losses.numel()
            for key, value in metric_sums(self.preference.kind, scored, batch).items():
                sums[key] += value
        total, count, *summed = self.parallel.sum_floats(total, count, *(sums[k] for k in METRICS))
        self.extra = {f"eval_{k}": v for k, v in metric_means(dict(zip(METRICS, summed))).items()}
        self.model.train()
        return total / max(count, 1)

    def preference_batches(self, job: Job) -> list[tuple[dict, bool]]:
        """``(batch, counts)``: this rank's eval batches, then filler batches (not counted) up to the
        number rank 0 has, so every rank runs as many forwards (FSDP gathers in each)."""
        par, examples, size = self.parallel, job.data.eval, job.optim.batch_size
        mine = list(
            preference_batches(examples, batch_size=size, pad_id=self.pad_id, rank=par.rank, world_size=par.world_size)
        )
        most = -(-(-(-len(examples) // par.world_size)) // size)
        filler = next(preference_batches(examples[:1], batch_size=1, pad_id=self.pad_id))
        return [(b, True) for b in mine] + [(filler, False)] * (most - len(mine))

    def due(self, active: list[Job], record: dict, every: int) -> dict[str, float | None]:
        """Run the evaluations due after a step (every ``every`` steps; several jobs: also each one's
        last step), write them into ``record``; returns job name -> loss of those that ran."""
        ran = {j.name: self.loss(j) for j in active if (every and j.step % every == 0) or (self.together and j.done)}
        if not self.together:
            record.update({"eval_loss": loss for loss in ran.values()})
            record.update(self.extra if ran else {})
            return ran
        evals = [loss for loss in ran.values() if loss is not None]
        for name, loss in ran.items():
            if loss is not None:
                record["adapters"][name]["eval_loss"] = loss
        if evals:
            record["eval_loss"] = sum(evals) / len(evals)
        return ran
