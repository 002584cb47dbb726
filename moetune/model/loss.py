"""Chunked causal-LM cross-entropy.

Full fp32 logits for a long batch are the largest activation in LoRA training: at vocab 151936
and 8192 tokens they take 151936 * 8192 * 4 B = 4.6 GiB, plus the same again for their gradient
(and 2.3 GiB more for a bf16 copy). Here the LM head and the loss run on chunks of
``chunk_size`` tokens (default 1024) under activation checkpointing: the forward keeps only each
chunk's scalar loss, and the backward recomputes one chunk's logits at a time. Peak logits memory
is ``chunk_size * vocab * 4`` bytes - 0.58 GiB for 1024 tokens at vocab 151936, an 8x saving at
8192 tokens (16x counting the gradient), for the price of one extra LM-head matmul.

Chunks cover every position, ignored ones (-100) included, as transformers' loss does: keeping
only the counted rows would size the work from the labels' values, which the host must read first
(a device sync per step, and a shape that changes every step).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .context import ForwardContext, current_context, forward_context

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t+1]; the last position predicts nothing."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


def _chunk_loss_sum(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    ctx: ForwardContext | None,
) -> torch.Tensor:
    # The head runs on a chunk of kept rows, and again in backward outside the model's forward:
    # give it a context whose "samples" are those rows, so per-sample adapters on the head apply.
    with forward_context(ctx):
        logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _row_context(ctx: ForwardContext | None, seq_len: int, start: int, end: int) -> ForwardContext | None:
    """Context for flat rows ``start:end`` (one "sample" per row; row i is in sample i // T), or
    ``ctx`` itself when no per-sample adapter names were given. Host arithmetic only."""
    if ctx is None or ctx.adapter_names is None:
        return ctx
    names = [ctx.adapter_names[i // seq_len] for i in range(start, end)]
    return ForwardContext(batch_size=len(names), seq_len=1, adapter_names=names)


def _chunk_sample_sums(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    samples: torch.Tensor,
    batch: int,
    ctx: ForwardContext | None,
) -> torch.Tensor:
    with forward_context(ctx):
        logits = head(hidden).float()
    losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.new_zeros(batch).index_add(0, samples, losses)


def chunked_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    per_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy of ``head(hidden)`` against shifted ``labels``.

    Args:
        head: maps (n, D) hidden states to (n, V) logits (the LM head, possibly with LoRA).
        hidden: (B, T, D) final hidden states.
        labels: (B, T) token ids, -100 where no loss is taken; shifted here.
        chunk_size: tokens per chunk.
        per_sample: return per-sample sums instead of the mean (several adapters trained in one
            forward each take the mean over their own samples' tokens).

    Returns:
        Scalar mean over counted tokens (0 with a gradient path if none count); with
        ``per_sample``, ``(sums (B,), counts (B,))`` in fp32.
    """
    targets = shift_labels(labels).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    (B, T), rows = hidden.shape[:2], targets.numel()
    kept = (targets != IGNORE_INDEX).view(B, T).sum(1)  # (B,) counted tokens per sample
    sample = torch.arange(B, device=hidden.device).repeat_interleave(T)
    ctx = current_context()
    total = hidden.new_zeros((B,) if per_sample else (), dtype=torch.float32)
    for start in range(0, rows, chunk_size):
        part_h, part_t = h[start : start + chunk_size], targets[start : start + chunk_size]
        part_ctx = _row_context(ctx, T, start, min(start + chunk_size, rows))
        fn, args = (
            (_chunk_sample_sums, (head, part_h, part_t, sample[start : start + chunk_size], B, part_ctx))
            if per_sample
            else (_chunk_loss_sum, (head, part_h, part_t, part_ctx))
        )
        total = total + (checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return (total, kept.float()) if per_sample else total / kept.sum().clamp_min(1)


def causal_lm_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    chunk_size: int = 1024,
    per_sample: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The causal LM's loss: padding (``attention_mask`` 0) never counts, whatever the labels say.

    Returns:
        ``(mean loss, per-sample sums (B,), per-sample counts (B,))``; the last two are None
        unless ``per_sample`` (see :func:`chunked_cross_entropy`).
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, -labels.shape[1] :] == 0, IGNORE_INDEX)
    if not per_sample:
        return chunked_cross_entropy(head, hidden, labels, chunk_size=chunk_size), None, None
    sums, counts = chunked_cross_entropy(head, hidden, labels, chunk_size=chunk_size, per_sample=True)
    return sums.sum() / counts.sum().clamp_min(1), sums, counts
