"""Evaluation during training: a job's mean eval loss, and the evaluations due after a step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .jobs import BATCH_KEYS, Job

if TYPE_CHECKING:
    from .loop import Trainer


@torch.no_grad()
def eval_loss(trainer: Trainer, job: Job) -> float | None:
    """Mean eval loss of ``job``'s eval data over its counted tokens (all ranks)."""
    if not job.data.eval:
        return None
    trainer.model.eval()
    total, count = 0.0, 0
    for batch, counts in trainer.parallel.eval_batches(
        job.data.eval, batch_size=job.optim.batch_size, pad_id=trainer.parts.tokenizer.pad_id
    ):
        batch = {k: batch[k].to(trainer.device) for k in BATCH_KEYS if k in batch}
        n = int((batch["labels"][:, 1:] != -100).sum()) if counts else 0
        names = {"adapter_names": [job.name] * batch["input_ids"].shape[0]} if trainer.together else {}
        with trainer.autocast():
            total += trainer.model(**batch, **names).loss.item() * n
        count += n
    total, count = trainer.parallel.sum_floats(total, count)
    trainer.model.train()
    return total / max(count, 1)


def evaluate_due(trainer: Trainer, active: list[Job], record: dict) -> None:
    """Periodic evaluation (``logging.eval_every``); several jobs: also each one's last step."""
    every, evals = trainer.config.logging.eval_every, []
    for j in active:
        if not ((every and j.step % every == 0) or (trainer.together and j.done)):
            continue
        loss = eval_loss(trainer, j)
        if not trainer.together:
            trainer.eval_loss = record["eval_loss"] = loss
        elif loss is not None:
            record["adapters"][j.name]["eval_loss"] = loss
            evals.append(loss)
    if evals:
        record["eval_loss"] = sum(evals) / len(evals)
