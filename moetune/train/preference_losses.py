"""The preference objectives on sequence log-probabilities, as TRL 1.x computes them.

Every function takes per-row sequence log-probabilities (summed over completion tokens; the
token counts where an objective averages) and returns ``(losses, chosen_rewards,
rejected_rewards)``: per-row losses, whose mean is the batch loss, and the implicit rewards
(detached) that the metrics report. Tests check each against TRL's own code on the same inputs:

- ``dpo``: ``DPOTrainer`` loss type ``sigmoid``, ``-log sigmoid(beta * (r_c - r_r))`` with the
  log-ratios ``r = logp_policy - logp_reference``; rewards ``beta * r``.
- ``ipo``: ``DPOTrainer`` loss type ``ipo``: ``(r_c / n_c - r_r / n_r - 1 / (2 beta))^2`` with
  ``n`` the completion's tokens; rewards ``beta * r``.
- ``simpo``: ``CPOTrainer`` loss type ``simpo`` (``cpo_alpha`` 0): average log-probs
  ``a = logp / n``, ``z = a_c - a_r - gamma / beta``,
  ``-(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z)``; rewards ``beta * a``.
- ``orpo``: ``ORPOTrainer``: ``nll(chosen) - beta * log sigmoid(log odds)``, with
  ``log odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))`` on average log-probs; the NLL is
  the chosen completions' mean token cross-entropy; rewards ``beta * a``.
- ``kto``: ``KTOTrainer`` loss type ``kto``: ``z = max(0, mean(logp_kl - logp_kl_ref))`` over the
  batch's mismatched rows (no gradient); desirable rows ``w_d (1 - sigmoid(beta (r - z)))``,
  undesirable ``w_u (1 - sigmoid(beta (z - r)))``; the loss is their mean over all rows.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, *, beta: float) -> Losses:
    """DPO. ``policy``, ``reference``: (2, B) summed log-probs, row 0 chosen, row 1 rejected."""
    ratios = policy - reference
    losses = -F.logsigmoid(beta * (ratios[0] - ratios[1]))
    rewards = beta * ratios.detach()
    return losses, rewards[0], rewards[1]


def ipo_losses(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, *, beta: float) -> Losses:
    """IPO. ``tokens``: (2, B) completion tokens of each sequence."""
    ratios = policy - reference
    per_token = ratios / tokens.clamp(min=1.0)
    losses = (per_token[0] - per_token[1] - 1 / (2 * beta)) ** 2
    rewards = beta * ratios.detach()
    return losses, rewards[0], rewards[1]


def simpo_losses(
    policy: torch.Tensor, tokens: torch.Tensor, *, beta: float, gamma: float, label_smoothing: float
) -> Losses:
    """SimPO (reference-free)."""
    average = policy / tokens
    z = average[0] - average[1] - gamma / beta
    losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    rewards = beta * average.detach()
    return losses, rewards[0], rewards[1]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation on either side of ``-log 2``."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(policy: torch.Tensor, tokens: torch.Tensor, nll: torch.Tensor, *, beta: float) -> Losses:
    """ORPO (reference-free). ``nll``: the chosen completions' mean token cross-entropy; it is
    added to each row's loss, so the mean over rows is ``nll - beta * mean(log sigmoid(log odds))``."""
    average = (policy / tokens).float()
    log_odds = (average[0] - average[1]) - (log1mexp(average[0]) - log1mexp(average[1]))
    losses = nll - beta * F.logsigmoid(log_odds)
    rewards = beta * average.detach()
    return losses, rewards[0], rewards[1]


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Losses:
    """KTO. ``policy``, ``reference``: (B,) summed log-probs of the rows; ``desirable`` (B,) bool;
    ``kl``: the batch's reference point z (a detached scalar). Rewards: of the desirable rows,
    then of the undesirable ones."""
    ratios = policy - reference
    chosen, rejected = ratios[desirable], ratios[~desirable]
    losses = torch.cat(
        (
            desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
            undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected))),
        )
    )
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_reference_point(
    policy_kl: torch.Tensor, reference_kl: torch.Tensor, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """KTO's z: the mean log-ratio of the mismatched rows (averaged over the data-parallel ranks),
    at least 0, without gradient."""
    return mean_over_ranks((policy_kl - reference_kl).mean().detach()).clamp(min=0)
