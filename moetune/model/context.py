"""Per-forward information that leaf modules may need but the model code should not thread through.

Adapter layers (in ``peft/``) need to know which sample each token belongs to and which adapter
that sample asked for, so one forward can serve a batch that mixes adapters. The causal LM sets a
:class:`ForwardContext` for the duration of its forward (and again when activation checkpointing
recomputes a layer); leaf modules read it with :func:`current_context`. It is a ``ContextVar``,
so nested or concurrent forwards never see each other's state.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class ForwardContext:
    """What a forward is running on.

    Attributes:
        batch_size: B of the current forward.
        seq_len: T of the current forward.
        adapter_names: one entry per sample (None = base only), or None for "all active adapters".
        token_mask: (B*T,) 1 for real tokens, 0 for padding, or None when there is no padding.
        per_sample: also keep routing sums per sample (router stats, losses), so a caller can
            split them by adapter after a forward that mixes adapters.
        records: what leaf modules report about this forward (e.g. the routing statistics of
            adapter mixtures), keyed by the reporter; the causal LM returns a copy. A key is
            written again, not added, when activation checkpointing recomputes a layer.
        extras: free-form slots for adapter layers (e.g. cached per-adapter row masks).
    """

    batch_size: int
    seq_len: int
    adapter_names: list[str | None] | None = None
    token_mask: torch.Tensor | None = None
    per_sample: bool = False
    records: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def sample_of_token(self, device: torch.device) -> torch.Tensor:
        """Sample index of each flattened token, shape (B*T,)."""
        key = ("sample_of_token", device)
        if key not in self.extras:
            self.extras[key] = torch.arange(self.batch_size, device=device).repeat_interleave(self.seq_len)
        return self.extras[key]


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("moetune_forward_context", default=None)


def current_context() -> ForwardContext | None:
    return _CONTEXT.get()


@contextlib.contextmanager
def forward_context(ctx: ForwardContext | None) -> Iterator[ForwardContext | None]:
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)
