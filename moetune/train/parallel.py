"""The run's parallel hooks: :class:`Parallel` is one process, where every hook is the identity, so
the training loop runs exactly as without ``torchrun``; :class:`~moetune.train.distributed.DataParallel`
overrides them for N ranks (see :mod:`moetune.train.distributed` for how a step stays exact).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..data import eval_batches
from ..model.loss import counted_tokens
from ..model.moe import RouterStats
from .checkpoint import rng_state, set_rng_state


class Parallel:
    """One process. Every hook is the identity, so the trainer behaves as without ``torchrun``."""

    rank, world_size, is_main, strategy = 0, 1, True, "single"

    def prepare(self, parts: Any) -> None:
        """Get the model of ``parts`` (a RunParts) ready on this rank, before optimizers exist."""

    def micro_weights(self, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
        """Per micro-batch of one step: the factor on its mean loss, its share ``n_i / n`` of the
        step's counted tokens (over every rank), so the weighted sum is the step's token mean."""
        local = torch.stack([counted_tokens(b).double().cpu() for b in batches])
        return token_shares(local, self._total(local.sum()))

    def _total(self, count: torch.Tensor) -> float:
        """The step's counted tokens over all ranks."""
        return float(count)

    def aux_loss(self, out: Any, num_experts: int) -> torch.Tensor | None:  # noqa: ARG002 - ranks need it
        """This rank's share of the global router load-balancing loss."""
        return out.aux_loss

    def gradient_sync(self, enabled: bool) -> None:
        """Whether the next backward reduces gradients (FSDP; off for all but the last micro-batch)."""

    def sync_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Sum gradients over ranks (replicate)."""

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def all_ok(self, ok: bool) -> bool:
        """True on every rank only if ``ok`` holds on every rank."""
        return ok

    def sum_floats(self, *values: float) -> list[float]:
        return list(values)

    def router_stats(self, stats: list[RouterStats]) -> list[RouterStats]:
        """Routing sums over all ranks (for metrics)."""
        return stats

    def eval_batches(self, examples: Sequence, *, batch_size: int, pad_id: int) -> Iterator[tuple[dict, bool]]:
        """``(batch, counts)``: this rank's eval batches; ``counts`` False for filler batches."""
        for batch in eval_batches(examples, batch_size=batch_size, pad_id=pad_id):
            yield batch, True

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def load_tensor(self, param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def rng_state(self) -> dict[str, Any]:
        return rng_state()

    def set_rng_state(self, state: dict[str, Any], *, seed: int, step: int) -> None:  # noqa: ARG002 - ranks need them
        set_rng_state(state)

    @contextlib.contextmanager
    def full_adapters(self, model: nn.Module) -> Iterator[None]:  # noqa: ARG002 - FSDP gathers from it
        """Inside the block, adapter parameters are full tensors (for writing adapter files)."""
        yield

    def barrier(self) -> None:
        """Wait for every rank."""


def token_shares(counts: torch.Tensor, total: float) -> list[float]:
    """Each count's share of ``total`` (all zero when nothing counts)."""
    return [float(n / total) if total > 0 else 0.0 for n in counts.tolist()]
