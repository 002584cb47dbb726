"""Preference tuning (``optim.objective``: dpo, ipo, simpo, orpo, kto) on the base as its own reference.

The policy is the model with the trained adapter; the reference is the same model with every
adapter off (``adapter_names=None`` per sample): no second copy of the base exists. Sequence
log-probabilities are the model's per-sample token sums over the completion labels
(``-sample_losses(out.token_loss)``, from the chunked cross-entropy, so full-vocabulary logits never
exist at once), divided by the completion's tokens where an objective averages.

Per micro-batch (B examples: 2B rows, see :mod:`moetune.data.preference`):

- dpo, ipo: the policy forward on all 2B rows (with gradient); the reference from a forward of the
  same rows with every adapter off (``reference: initial``: only the frozen copy of the starting
  adapter), without gradient (it keeps no activations) and in eval mode, or from the table
  precomputed once (``precompute_reference``, :mod:`.reference`);
- simpo, orpo: the policy forward only (reference-free);
- kto: the policy forward on the B rows; one forward without gradient serves KTO's KL rows under
  the policy (the adapter on those samples) and, unless precomputed, all 2B rows under the
  reference (no adapter on those): per-sample adapter selection puts them in one batch.

:class:`PreferenceLoss` is the loop's step loss for these objectives: each micro-batch's mean loss
over its rows is weighted by its share of the step's rows (all ranks), plus the router aux loss
and mixture router losses as in supervised training; it also sums the step's metrics: reward
accuracy, chosen / rejected rewards and their margin, the policy's log-probs, and a KL estimate
(dpo, ipo: the mean log-ratio of policy to reference over the step's completions; kto: its
reference point z).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from ..config.preference import REFERENCE_FREE
from ..peft.mixtures.stats import adapter_router_loss
from .logps import cat_rows, completion_tokens, rows, sequence_logps
from .losses import StepLoss, add_counts
from .reference import reference_table
from .preference_losses import dpo_losses, ipo_losses, kto_losses, kto_reference_point, orpo_losses, simpo_losses

log = logging.getLogger(__name__)
METRICS = ("pairs", "correct", "reward_chosen", "reward_rejected", "chosen_rows", "rejected_rows")
METRICS += ("logps_chosen", "logps_rejected", "kl", "kl_rows")


@dataclass
class ScoredBatch:
    """One micro-batch's per-row losses, rewards and the policy forward's output."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy: torch.Tensor  # (2, B) summed log-probs (kto: (B,))
    out: object
    kl: torch.Tensor | None = None  # per-row log-ratios (dpo, ipo) or the reference point z (kto)


class PreferenceObjective:
    """Preference objective ``kind`` with ``options`` (:class:`~moetune.config.preference.PreferenceSection`)
    on ``model``, whose trained adapter is ``name``.

    Args:
        reference: precomputed reference log-probs of the training examples
            (:class:`~moetune.train.reference.ReferenceTable`), or None to compute them each step.
        reference_name: the frozen adapter the reference runs with (``reference: initial``), or
            None: every adapter off.
        mean_over_ranks: averages a scalar tensor over the data-parallel ranks (KTO's z).
    """

    def __init__(
        self, model, name: str, *, kind: str, options, reference=None, reference_name=None, mean_over_ranks=None
    ) -> None:
        self.kind, self.opts, self.model, self.name = kind, options, model, name
        self.reference, self.reference_name = reference, reference_name
        self.mean_over_ranks = mean_over_ranks or (lambda value: value)

    def logps(self, batch: dict[str, torch.Tensor], adapter_names=None) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Per-row summed completion log-probs, completion token counts and the forward's output."""
        logps, out = sequence_logps(self.model, batch, adapter_names)
        return logps, completion_tokens(batch).to(logps), out

    @torch.no_grad()
    def unlearnt_logps(self, batch: dict[str, torch.Tensor], adapter_names: list[str | None]) -> torch.Tensor:
        """Log-probs of rows that take no gradient (the reference; KTO's KL rows), in eval mode: no
        adapter dropout makes them noisy, so the precomputed table equals them."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.logps(batch, adapter_names)[0]
        finally:
            self.model.train(was_training)

    def reference_logps(self, batch: dict[str, torch.Tensor], train: bool = True) -> torch.Tensor:
        """(2B,) reference log-probs of a batch's rows: from the table (training batches) or a
        forward with every adapter off (or only the frozen starting adapter)."""
        if train and self.reference is not None:
            return self.reference.lookup(batch["example_index"]).to(batch["input_ids"].device)
        return self.unlearnt_logps(batch, [self.reference_name] * batch["input_ids"].shape[0])

    def score(self, batch: dict[str, torch.Tensor], *, train: bool = True) -> ScoredBatch:
        """Losses and rewards of a micro-batch (policy with gradient unless under no_grad)."""
        if self.kind == "kto":
            return self._score_kto(batch, train)
        policy, tokens, out = self.logps(batch)
        policy, tokens = policy.view(2, -1), tokens.view(2, -1)
        o = self.opts
        if self.kind == "simpo":
            losses = simpo_losses(policy, tokens, beta=o.beta, gamma=o.gamma, label_smoothing=o.label_smoothing)
            return ScoredBatch(*losses, policy=policy, out=out)
        if self.kind == "orpo":
            nll = -policy[0].sum() / tokens[0].sum().clamp(min=1)  # the chosen completions' mean token NLL
            return ScoredBatch(*orpo_losses(policy, tokens, nll, beta=o.beta), policy=policy, out=out)
        reference = self.reference_logps(batch, train).view(2, -1)
        if self.kind == "ipo":
            losses = ipo_losses(policy, reference, tokens, beta=o.beta)
        else:
            losses = dpo_losses(policy, reference, beta=o.beta)
        return ScoredBatch(*losses, policy=policy, out=out, kl=(policy - reference).detach().flatten())

    def _score_kto(self, batch: dict[str, torch.Tensor], train: bool) -> ScoredBatch:
        n = batch["input_ids"].shape[0] // 2
        first, second = rows(batch, slice(0, n)), rows(batch, slice(n, 2 * n))
        policy, _, out = self.logps(first)
        cached = train and self.reference is not None
        parts, names = [second], [self.name] * n
        if not cached:
            parts, names = [second, first, second], names + [self.reference_name] * (2 * n)
        scored = self.unlearnt_logps(cat_rows(parts), names)
        reference = self.reference.lookup(batch["example_index"]).to(scored) if cached else scored[n:]
        policy_kl, reference_kl = scored[:n], reference[n:]
        z = kto_reference_point(policy_kl, reference_kl, self.mean_over_ranks)
        o = self.opts
        losses = kto_losses(
            policy,
            reference[:n],
            batch["kto_label"],
            z,
            beta=o.beta,
            desirable_weight=o.desirable_weight,
            undesirable_weight=o.undesirable_weight,
        )
        return ScoredBatch(*losses, policy=policy, out=out, kl=z)


def metric_sums(kind: str, scored: ScoredBatch, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """What a micro-batch adds to the step's metrics (sums, averaged in :func:`metric_means`)."""
    c, r, policy = scored.chosen_rewards, scored.rejected_rewards, scored.policy.detach()
    sums = dict.fromkeys(METRICS, 0.0)
    sums.update(reward_chosen=float(c.sum()), reward_rejected=float(r.sum()))
    sums.update(chosen_rows=float(c.numel()), rejected_rows=float(r.numel()))
    if kind == "kto":
        desirable = batch["kto_label"]
        sums.update(logps_chosen=float(policy[desirable].sum()))
        sums.update(logps_rejected=float(policy[~desirable].sum()))
        sums.update(kl=float(scored.kl), kl_rows=1.0)
        return sums
    sums.update(pairs=float(c.numel()), correct=float((c > r).sum()))
    sums.update(logps_chosen=float(policy[0].sum()), logps_rejected=float(policy[1].sum()))
    if scored.kl is not None:
        sums.update(kl=float(scored.kl.sum()), kl_rows=float(scored.kl.numel()))
    return sums


def metric_means(sums: dict[str, float]) -> dict[str, float]:
    """The step's (or evaluation's) metrics from summed :func:`metric_sums`."""
    out = {}
    if sums["pairs"]:
        out["reward_accuracy"] = sums["correct"] / sums["pairs"]
    for side in ("chosen", "rejected"):
        if sums[f"{side}_rows"]:
            out[f"reward_{side}"] = sums[f"reward_{side}"] / sums[f"{side}_rows"]
            out[f"logps_{side}"] = sums[f"logps_{side}"] / sums[f"{side}_rows"]
    if "reward_chosen" in out and "reward_rejected" in out:
        out["reward_margin"] = out["reward_chosen"] - out["reward_rejected"]
    if sums["kl_rows"]:
        out["kl"] = sums["kl"] / sums["kl_rows"]
    return out


class PreferenceLoss(StepLoss):
    """The loop's step loss for a preference objective (one job; see the module docstring)."""

    def __init__(self, names, micro, *, model, parallel, objective: PreferenceObjective, aux_loss_coef: float) -> None:
        super().__init__(
            names, micro, model=model, parallel=parallel, objectives=None, aux_loss_coef=aux_loss_coef, together=False
        )
        self.objective = objective
        local = [p[0]["example_index"].numel() for p in micro]
        total = parallel.sum_floats(float(sum(local)))[0]
        self.weights = [n / total for n in local]
        self.metrics = dict.fromkeys(METRICS, 0.0)

    def micro(
        self, index: int, parts: Sequence[dict], *, device: torch.device, autocast: Callable[[], ContextManager]
    ) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in parts[0].items()}
        sums = self.sums[self.names[0]]
        with autocast():
            scored = self.objective.score(batch)
        out = scored.out
        self.counts, self.stats, self.records = add_counts(self.counts, out.router_stats), out.router_stats, out.records
        loss = scored.losses.mean() * self.weights[index]
        sums["loss"] += loss.item()
        if out.aux_loss is not None and self.aux_coef:
            aux = self.parallel.aux_loss(out, self.model.args.moe.num_experts) / self.accum
            loss = loss + self.aux_coef * aux
            sums["aux_loss"] += aux.item()
        loss = self._router(loss, adapter_router_loss(out.records), sums)
        sums["tokens"] += int(batch["attention_mask"].sum())
        for key, value in metric_sums(self.objective.kind, scored, batch).items():
            self.metrics[key] += value
        return loss

    def totals(self, name: str) -> dict[str, float]:
        totals = super().totals(name)
        summed = dict(zip(METRICS, self.parallel.sum_floats(*(self.metrics[k] for k in METRICS))))
        return {**totals, "preference": metric_means(summed)}


def step_loss(names, micro, *, preference: PreferenceObjective | None, **kwargs) -> StepLoss:
    """The step loss of the loop: :class:`PreferenceLoss` for a preference objective, else :class:`StepLoss`."""
    if preference is None:
        return StepLoss(names, micro, **kwargs)
    keep = ("model", "parallel", "aux_loss_coef")
    return PreferenceLoss(names, micro, objective=preference, **{k: kwargs[k] for k in keep})


def preference_objective(trainer) -> PreferenceObjective | None:
    """The run's preference objective (None for ``sft``), its reference table computed or read
    back first when ``precompute_reference`` asks for it."""
    optim = trainer.config.optim
    if optim.objective == "sft":
        return None
    name = trainer.config.reference_adapter
    if optim.objective not in REFERENCE_FREE and trainer.config.adapters[0].path is not None and name is None:
        log.warning(
            "adapter '%s' starts from %s; the reference is the base without it (every adapter off), "
            "not the adapter as loaded (optim.preference.reference: initial scores against that)",
            trainer.jobs[0].name,
            trainer.config.adapters[0].path,
        )
    precompute = optim.preference.precompute_reference and optim.objective not in REFERENCE_FREE
    world = trainer.parallel.world_size

    def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
        return value if world == 1 else value.new_tensor(trainer.parallel.sum_floats(float(value))[0] / world)

    return PreferenceObjective(
        trainer.model,
        trainer.jobs[0].name,
        kind=optim.objective,
        options=optim.preference,
        reference=reference_table(trainer, optim.objective, name) if precompute else None,
        reference_name=name,
        mean_over_ranks=mean_over_ranks,
    )
