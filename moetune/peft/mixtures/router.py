"""Routers of adapter mixtures: router logits -> chosen experts and their weights, plus the sums
the load-balancing loss and the router metrics need.

Legend: N routed tokens, D router input dim, E experts, K expert slots per token (k for
``top_k``, E for ``top_p`` and ``dense``, 1 for ``switch``). A slot that holds no expert (``top_p``
beyond the mass, ``switch`` over capacity) has expert id E - a sentinel that sorts after every
real expert, so the rows of real experts stay one contiguous block after dispatch - and weight 0.

Routers run in fp32 (their weight is fp32, the input is upcast), as MixLoRA's do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import MixtureConfig
from ...model.dispatch import expert_counts


@dataclass
class MixtureStats:
    """Routing sums of one router for one adapter, over that adapter's real (non-pad) tokens.

    Attributes:
        counts: (E,) tokens sent to each expert (``switch``: before the capacity cut; ``dense``:
            the summed probabilities, a soft count). No gradient.
        prob_sum: (E,) summed router probabilities (carries the gradient of the aux loss).
        tokens: scalar, number of tokens routed.
        z_sum: scalar, summed ``logsumexp(logits)^2`` (carries gradient; the switch z-loss).
        entropy_sum: scalar, summed per-token routing entropy in nats (no gradient).
        dropped: scalar, tokens over capacity (``switch``), else 0.
    """

    counts: torch.Tensor
    prob_sum: torch.Tensor
    tokens: torch.Tensor
    z_sum: torch.Tensor
    entropy_sum: torch.Tensor
    dropped: torch.Tensor

    def balance_loss(self) -> torch.Tensor:
        """``E * sum_e f_e * P_e``: f_e share of tokens sent to e, P_e mean probability of e."""
        n = self.tokens.clamp_min(1)
        return self.counts.numel() * torch.sum((self.counts / n) * (self.prob_sum / n))

    def z_loss(self) -> torch.Tensor:
        return self.z_sum / self.tokens.clamp_min(1)


@dataclass
class MixtureRecord:
    """What a mixture layer reports for one adapter in one forward (``AdapterContext.records``)."""

    adapter: str
    stats: MixtureStats
    aux_coef: float
    z_coef: float

    def loss(self) -> torch.Tensor:
        """The router losses with their coefficients (the z-loss is kept for ``switch`` only)."""
        loss = self.aux_coef * self.stats.balance_loss()
        return loss + self.z_coef * self.stats.z_loss() if self.z_coef else loss


@dataclass
class Route:
    """Where each token goes.

    Attributes:
        weights: (N, K) combine weights in the input dtype (0 on unused slots).
        experts: (N, K) int64 expert ids, E on unused slots.
        variable: whether unused slots may exist (``top_p``, ``switch``).
        base_weight: (N,) weight of the frozen FFN's own output (``switch``), or None.
        stats: the sums for losses and metrics.
    """

    weights: torch.Tensor
    experts: torch.Tensor
    variable: bool
    base_weight: torch.Tensor | None
    stats: MixtureStats


def route(
    x: torch.Tensor, weight: torch.Tensor, cfg: MixtureConfig, *, training: bool, sequence: torch.Tensor | None = None
) -> Route:
    """Route tokens ``x`` (N, D) with router ``weight`` (E, D) as ``cfg.routing`` says.

    Args:
        sequence: (N,) sequence id of each token; ``switch`` with ``expert_capacity`` counts the
            capacity per sequence (all tokens are one sequence when None).
    """
    h = x.float()
    if training and cfg.jitter_noise > 0:  # noise on the router input only; the experts see x
        h = h * torch.empty_like(h).uniform_(1.0 - cfg.jitter_noise, 1.0 + cfg.jitter_noise)
    with torch.autocast(h.device.type, enabled=False):  # the router stays fp32 under mixed precision
        logits = F.linear(h, weight.float())  # (N, E)
    probs = torch.softmax(logits, dim=-1)
    E = probs.shape[-1]
    if cfg.routing == "top_k":
        top, experts = torch.topk(probs, cfg.top_k, dim=-1)
        weights, variable, base = top / top.sum(-1, keepdim=True), False, None
        counts = expert_counts(experts, E).float()
    elif cfg.routing == "top_p":
        weights, experts = _top_p(probs, cfg.top_p, cfg.top_p_renormalize)
        variable, base = True, None
        counts = expert_counts(experts, E).float()
    elif cfg.routing == "switch":
        weights, experts, base, counts = _switch(probs, cfg, sequence)
        variable = True
    else:  # dense: every expert, weighted by its probability
        weights, variable, base = probs, False, None
        experts = torch.arange(E, device=probs.device).expand(probs.shape[0], E)
        counts = probs.detach().sum(0)
    stats = _stats(logits, probs, counts, dropped=(experts[:, 0] == E).sum() if cfg.routing == "switch" else None)
    return Route(
        weights=weights.to(x.dtype),
        experts=experts,
        variable=variable,
        base_weight=None if base is None else base.to(x.dtype),
        stats=stats,
    )


def _top_p(probs: torch.Tensor, top_p: float, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fewest most-probable experts whose probabilities reach ``top_p`` (at least one)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the expert that crosses top_p is kept
    weights = sorted_p * keep
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, torch.where(keep, order, probs.shape[-1])


def _switch(probs: torch.Tensor, cfg: MixtureConfig, sequence: torch.Tensor | None):
    """Top-1 with a capacity. A token over capacity keeps the frozen FFN's output; a routed token
    gets ``p * expert + (1 - p) * frozen FFN``, so the router learns from the LM loss (as in
    Switch) while the model is unchanged at init (all LoRA B = 0)."""
    E, N = probs.shape[-1], probs.shape[0]
    p, expert = probs.max(dim=-1)
    if cfg.expert_capacity is not None:
        groups, capacity = sequence if sequence is not None else torch.zeros_like(expert), cfg.expert_capacity
    else:
        groups, capacity = torch.zeros_like(expert), math.ceil(cfg.capacity_factor * N / E)
    keep = _rank_in_group(groups * E + expert) < capacity
    counts = expert_counts(expert, E).float()
    base = torch.where(keep, 1.0 - p, torch.ones_like(p))
    return torch.where(keep, p, torch.zeros_like(p))[:, None], torch.where(keep, expert, E)[:, None], base, counts


def _rank_in_group(key: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements (in order) share its key. (N,) -> (N,)."""
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first = torch.searchsorted(sorted_key, sorted_key)  # start of each element's run
    rank = torch.empty_like(key)
    rank[order] = torch.arange(key.numel(), device=key.device) - first
    return rank


def _stats(
    logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, dropped: torch.Tensor | None
) -> MixtureStats:
    with torch.no_grad():
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    zero = probs.new_zeros(())
    return MixtureStats(
        counts=counts,
        prob_sum=probs.sum(0),
        tokens=probs.new_full((), float(probs.shape[0])),  # a device fill, not a copy from the host
        z_sum=torch.logsumexp(logits, dim=-1).pow(2).sum(),
        entropy_sum=entropy,
        dropped=zero if dropped is None else dropped.float(),
    )
