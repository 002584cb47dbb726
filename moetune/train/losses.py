"""The loss of one training step, assembled per job from the model's outputs.

The model returns the chunked cross-entropy (``.loss``, a mean over counted tokens, and
``.token_loss``, per position), router statistics (sums and per-token routing) and what adapter
layers recorded. The loss math is :mod:`moetune.model.loss`; this module only decides which of it
each job gets and with what weight, turning one micro-batch's output into the number to
backpropagate:

- **One job** (one trained adapter, possibly over frozen ones): ``out.loss`` weighted by the
  micro-batch's share ``n_i / n`` of the step's counted tokens over every rank
  (:meth:`Parallel.micro_weights`), so ``grad_accum`` micro-batches equal one batch of all their rows;
  plus the objectives' terms (AdaLoRA regulariser, distillation) with the same weight.
- **Several jobs** in one mixed batch: a job's LM loss is the sum of its rows' token losses over its
  step's counted tokens, so each adapter gets exactly its own gradient; its aux loss is the
  load-balancing loss of its rows' routing alone (:func:`~moetune.model.loss.router_stats_of_samples`).
- Router load-balancing loss (``optim.aux_loss_coef``; the rank's share of the global loss when
  distributed, or on a job's own rows) and the mixtures' own router losses are per micro-batch,
  averaged over the step's micro-batches.

:class:`StepLoss` also keeps what the step reports: each job's loss, aux and router losses, tokens,
the routed-token counts of all micro-batches (router-bias balancing) and the last forward's records.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Sequence

import torch

from ..model.loss import counted_tokens, load_balancing_loss, router_stats_of_samples, sample_losses
from ..model.moe import RouterStats
from ..peft.mixtures.stats import adapter_router_loss
from .jobs import merge_batches


def add_counts(acc: list[RouterStats], stats: list[RouterStats]) -> list[RouterStats]:
    """Per-layer routed-token counts summed over a step's micro-batches (no gradient)."""
    stats = [
        RouterStats(counts=s.counts.detach(), prob_sum=s.prob_sum.detach(), tokens=torch.as_tensor(s.tokens).detach())
        for s in stats
    ]
    if not acc:
        return stats
    return [
        RouterStats(counts=a.counts + s.counts, prob_sum=a.prob_sum + s.prob_sum, tokens=a.tokens + s.tokens)
        for a, s in zip(acc, stats)
    ]


class StepLoss:
    """The losses of one step of ``names`` (the jobs stepping, in batch order) over ``micro``
    (per micro-batch, one batch per job).

    Args:
        together: the run trains several jobs (per-sample losses), even when one is left stepping.
        model: the model (its ``args.moe.num_experts`` for the aux loss).
        parallel: the run's :class:`~moetune.train.parallel.Parallel` (token shares, aux loss share).
        objectives: the run's :class:`~moetune.train.objectives.Objectives` (one job only).
        aux_loss_coef: weight of the router load-balancing loss.
        pad_id: the tokenizer's padding id (several jobs' batches are padded into one).
    """

    def __init__(
        self,
        names: Sequence[str],
        micro: Sequence[Sequence[dict]],
        *,
        model,
        parallel,
        objectives,
        aux_loss_coef: float,
        together: bool,
        pad_id: int = 0,
    ) -> None:
        self.pad_id = pad_id
        self.names, self.model, self.parallel, self.objectives = list(names), model, parallel, objectives
        self.aux_coef, self.accum, self.together = aux_loss_coef, len(micro), together
        if self.together:  # each job's counted tokens over all its micro-batches
            self.counted = [sum(int(counted_tokens(parts[i])) for parts in micro) for i in range(len(names))]
        else:
            self.weights = parallel.micro_weights([parts[0] for parts in micro])
        self.sums = {n: {"loss": 0.0, "aux_loss": 0.0, "router_loss": 0.0, "tokens": 0} for n in self.names}
        self.counts: list[RouterStats] = []
        self.stats: list[RouterStats] = []
        self.records: dict = {}

    def micro(
        self, index: int, parts: Sequence[dict], *, device: torch.device, autocast: Callable[[], ContextManager]
    ) -> torch.Tensor:
        """Forward of micro-batch ``index`` (every job's part of it) and the loss to backpropagate."""
        batch = {k: v.to(device) for k, v in merge_batches(parts, self.pad_id).items()}
        with autocast():
            out = self.model(**batch, **self.forward_kwargs(parts))
            extra = self.objective_terms(batch, out)
        return self.add(index, parts, batch, out, extra)

    def forward_kwargs(self, parts: Sequence[dict]) -> dict[str, Any]:
        """Extra forward arguments: one adapter per sample (several jobs), or the objectives' own."""
        if self.together:
            return {"adapter_names": [n for n, b in zip(self.names, parts) for _ in range(b["input_ids"].shape[0])]}
        return self.objectives.forward_kwargs

    def objective_terms(self, batch: dict[str, torch.Tensor], out) -> torch.Tensor | None:
        """The objectives' terms for this micro-batch (run inside the forward's autocast)."""
        return None if self.together else self.objectives.loss(self.model, batch, out)

    def add(
        self, index: int, parts: Sequence[dict], batch: dict[str, torch.Tensor], out, extra: torch.Tensor | None
    ) -> torch.Tensor:
        """Micro-batch ``index``'s loss to backpropagate (all jobs together); updates the sums."""
        self.counts, self.stats, self.records = add_counts(self.counts, out.router_stats), out.router_stats, out.records
        if not self.together:
            return self._whole(index, batch, out, extra)
        total, start, sums = 0.0, 0, sample_losses(out.token_loss)
        for i, (name, b) in enumerate(zip(self.names, parts)):
            rows = torch.arange(start, start + b["input_ids"].shape[0], device=sums.device)
            start += len(rows)
            total = total + self._rows(i, name, rows, b, out, sums)
        return total

    def _whole(self, index: int, batch: dict[str, torch.Tensor], out, extra: torch.Tensor | None) -> torch.Tensor:
        """One job: the batch's mean loss weighted by its share of the step's tokens."""
        sums, weight = self.sums[self.names[0]], self.weights[index]
        ce = out.loss * weight
        loss = ce if extra is None else ce + extra * weight
        if out.aux_loss is not None and self.aux_coef:
            aux = self.parallel.aux_loss(out, self.model.args.moe.num_experts) / self.accum
            loss = loss + self.aux_coef * aux
            sums["aux_loss"] += aux.item()
        loss = self._router(loss, adapter_router_loss(out.records), sums)
        sums["loss"] += ce.item()
        sums["tokens"] += int(batch["attention_mask"].sum())
        return loss

    def _rows(self, i: int, name: str, rows: torch.Tensor, part: dict, out, sample_loss: torch.Tensor) -> torch.Tensor:
        """Job ``name`` of a mixed batch: its rows' token sum over its step's counted tokens."""
        sums = self.sums[name]
        loss = ce = sample_loss[rows].sum() / max(self.counted[i], 1)
        if out.router_stats and self.aux_coef:
            mine = router_stats_of_samples(out.router_stats, rows, len(sample_loss))
            aux = load_balancing_loss(mine, self.model.args.moe.num_experts) / self.accum
            loss = loss + self.aux_coef * aux
            sums["aux_loss"] += aux.item()
        loss = self._router(loss, adapter_router_loss(out.records, name), sums)
        sums["loss"] += ce.item()
        sums["tokens"] += int(part["attention_mask"].sum())
        return loss

    def _router(self, loss: torch.Tensor, router: torch.Tensor | None, sums: dict) -> torch.Tensor:
        """Mixtures of LoRA experts: their own router losses, averaged over micro-batches."""
        if router is None:
            return loss
        router = router / self.accum
        sums["router_loss"] += router.item()
        return loss + router

    def totals(self, name: str) -> dict[str, float]:
        """Job ``name``'s loss, aux loss and tokens over every rank, and its router loss."""
        s = self.sums[name]
        loss, aux, tokens = self.parallel.sum_floats(s["loss"], s["aux_loss"], s["tokens"])
        return {"loss": loss, "aux_loss": aux, "router_loss": s["router_loss"], "tokens": int(tokens)}
