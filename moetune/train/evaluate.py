"""Evaluation during training: a job's mean eval loss, and the evaluations due after a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from .jobs import BATCH_KEYS, Job
from .parallel import Parallel


@dataclass
class Evaluator:
    """What evaluating a job needs from the run (several jobs: each sample names its adapter)."""

    model: nn.Module
    parallel: Parallel
    device: torch.device
    autocast: Callable[[], ContextManager]
    pad_id: int
    together: bool

    @torch.no_grad()
    def loss(self, job: Job) -> float | None:
        """Mean eval loss of ``job``'s eval data over its counted tokens (all ranks)."""
        if not job.data.eval:
            return None
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

    def due(self, active: list[Job], record: dict, every: int) -> dict[str, float | None]:
        """Run the evaluations due after a step (every ``every`` steps; several jobs: also each one's
        last step), write them into ``record``; returns job name -> loss of those that ran."""
        ran = {j.name: self.loss(j) for j in active if (every and j.step % every == 0) or (self.together and j.done)}
        if not self.together:
            record.update({"eval_loss": loss for loss in ran.values()})
            return ran
        evals = [loss for loss in ran.values() if loss is not None]
        for name, loss in ran.items():
            if loss is not None:
                record["adapters"][name]["eval_loss"] = loss
        if evals:
            record["eval_loss"] = sum(evals) / len(evals)
        return ran
