"""Sequence log-probabilities of a preference batch's rows, from the model's public forward.

The one place that asks the model for them: the summed log-probs of each row's labelled tokens are
the negated per-sample sums of the model's chunked cross-entropy (full-vocabulary logits never
exist at once), with ``adapter_names`` choosing each row's adapter (None: the base alone).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.loss import sample_losses

INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def rows(batch: dict[str, torch.Tensor], index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The model inputs of some rows of a preference batch."""
    return {k: batch[k][index] for k in INPUTS}


def cat_rows(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in INPUTS}


def sequence_logps(model, batch: dict[str, torch.Tensor], adapter_names=None) -> tuple[torch.Tensor, object]:
    """(rows,) log-probs of each row's labelled tokens, summed (the negated per-sample sums of the
    model's chunked cross-entropy), and the forward's output."""
    out = model(**rows(batch, slice(None)), adapter_names=adapter_names)
    return -sample_losses(out.token_loss), out


def completion_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) tokens each row's log-prob sums over: shifted labels != -100 on real positions."""
    return ((batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0)).sum(-1)
