"""The losses: chunked causal-LM cross-entropy, the router load-balancing loss, and their
per-sample sums for batches that several adapters share.

Everything that turns model outputs into loss numbers is here, below ``peft/`` and ``train/``,
because the model's own forward must return ``.loss`` and ``.aux_loss`` (the transformers
contract) and ``model/`` imports nothing above it. The model keeps per-token information - each
position's cross-entropy (``CausalLMOutput.token_loss``) and each layer's per-token routing
(``RouterStats.routing``) - and the splits by sample (:func:`sample_losses`,
:func:`router_stats_of_samples`) are computed here, on demand, by whoever needs them (the trainer
for several adapters in one batch, ``moetune eval`` for per-choice log-likelihoods).

Chunking: full fp32 logits for a long batch are the largest activation in LoRA training: at
vocab 151936 and 8192 tokens they take 151936 * 8192 * 4 B = 4.6 GiB, plus the same again for
their gradient (and 2.3 GiB more for a bf16 copy). Here the LM head and the loss run on chunks of
``chunk_size`` tokens (default 1024), so peak logits memory is ``chunk_size * vocab * 4`` bytes -
0.58 GiB for 1024 tokens at vocab 151936, an 8x saving at 8192 tokens (16x counting the gradient).
When no parameter of the head trains (LoRA elsewhere, the usual case), each chunk's gradient with
respect to its hidden rows is computed in the forward, right after its loss (a fused linear
cross-entropy): each position's loss depends on its own row only, so whatever weights the backward
brings per position (1/count for the mean, other sums for per-sample losses) scale those rows, and
the forward keeps one (chunk, D) gradient in place of the chunk's input. That is two LM-head matmuls
per chunk, as with full logits. A head that trains needs its parameter gradients weighted inside the
sum, so it runs under activation checkpointing instead: the forward keeps each chunk's per-position
losses and the backward recomputes one chunk's logits at a time (one LM-head matmul more).

Chunks cover every position, ignored ones (-100) included, as transformers' loss does: keeping
only the counted rows would size the work from the labels' values, which the host must read first
(a device sync per step, and a shape that changes every step). Each chunk is a contiguous range of
the flattened ``B*T`` positions, which the head call is told (:func:`~.context.on_rows`).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .context import in_forward_context, on_rows
from .moe import RouterStats

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t+1]; the last position predicts nothing."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


def counted_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the causal-LM loss averages over: shifted labels != -100 on real positions."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    if "attention_mask" in batch:
        keep = keep & (batch["attention_mask"][:, 1:] != 0)
    return keep.sum()


def _chunk_losses(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, rows: range
) -> torch.Tensor:
    # The head runs on some of the forward's tokens (and again in backward): say which.
    with on_rows(rows):
        logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def _losses_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 cross-entropy of ``logits`` (n, V) and its gradient ``softmax - onehot``,
    written over ``logits`` in their dtype; rows whose target is ignored get 0 and 0.

    The rows go in blocks of about :func:`_block_bytes` of fp32: each block is converted, reduced,
    exponentiated and written back while it is in cache, and no (n, V) fp32 temporary exists. At
    vocab 8192 that took the loss's elementwise work from 39 to 18 ms per 1024 bf16 rows, at vocab
    151936 from 936 to 268 ms (and 620 MB of fp32 copies to 10 MB) on the benchmarks' CPU."""
    counted = (targets != IGNORE_INDEX).unsqueeze(1)
    index = targets.clamp_min(0).unsqueeze(1)  # ignored rows pick column 0, then count for nothing
    losses = logits.new_empty(logits.shape[0], dtype=torch.float32)
    step = max(1, _block_bytes(logits.device) // (4 * logits.shape[1]))
    for start in range(0, logits.shape[0], step):
        rows = slice(start, start + step)
        losses[rows] = _block_losses_and_grad(logits[rows], index[rows], counted[rows])
    return losses, logits


def _block_bytes(device: torch.device) -> int:
    """fp32 bytes of logits per block: a few MB on CPU (the passes stay in cache; 2-8 MB measured
    best here), more elsewhere, where each pass is a kernel launch and the memory is fast."""
    return 8 << 20 if device.type == "cpu" else 256 << 20


def _block_losses_and_grad(logits: torch.Tensor, index: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """:func:`_losses_and_logit_grad` on a block of rows. The loss is ``log(sum(exp(x - m))) + m -
    x[target]`` with ``m`` the row's max, as ``torch.logsumexp`` computes it (same bits); the
    gradient is ``exp(x - m) / sum``."""
    x, weight = logits.float(), counted.float()
    top = x.amax(dim=1, keepdim=True)
    top.masked_fill_(top.abs() == float("inf"), 0)  # as logsumexp: an all -inf row gives -inf, not NaN
    picked = x.gather(1, index)
    total = x.sub_(top).exp_().sum(dim=1, keepdim=True)
    losses = (total.log().add_(top) - picked) * weight
    x.mul_(weight / total).scatter_add_(1, index, -weight)
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)
    return losses.squeeze(1)


class _FusedChunkLosses(torch.autograd.Function):
    """A chunk's per-position losses; its gradient to the hidden rows is computed in forward (each
    row's gradient of its own loss) and scaled in backward by the weight each loss receives."""

    @staticmethod
    def forward(ctx, head, hidden, targets, rows):
        with torch.enable_grad(), on_rows(rows):
            h = hidden.detach().requires_grad_()
            out = head(h)
        # the gradient is written over the head's output (its backward does not read it): that
        # (n, V) buffer is the only one live (PyTorch's cross_entropy would hold fp32 logits,
        # log-probabilities and their gradient besides)
        losses, grad_logits = _losses_and_logit_grad(out.detach(), targets)
        (grad,) = torch.autograd.grad(out, h, grad_logits)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return None, (grad.float() * grad_losses[:, None]).to(grad.dtype), None, None


def _head_trains(head: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether a parameter of ``head`` takes a gradient (any plain callable might)."""
    return not isinstance(head, torch.nn.Module) or any(p.requires_grad for p in head.parameters())


def _chunk_fn(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> Callable[..., torch.Tensor]:
    """How each chunk's losses are computed: plainly without autograd, fused (gradient in forward)
    when only the hidden states need one, else checkpointed (recomputed in backward)."""
    if not torch.is_grad_enabled():
        return _chunk_losses
    if not _head_trains(head):
        return _FusedChunkLosses.apply if hidden.requires_grad else _chunk_losses
    return functools.partial(checkpoint, in_forward_context(_chunk_losses), use_reentrant=False)


def chunked_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``head(hidden)`` against shifted ``labels``, by chunks of positions.

    Args:
        head: maps (n, D) hidden states to (n, V) logits (the LM head, possibly with LoRA).
        hidden: (B, T, D) final hidden states.
        labels: (B, T) token ids, -100 where no loss is taken; shifted here.
        chunk_size: positions per chunk.

    Returns:
        ``(mean, token_loss)``: the scalar mean over counted tokens (0 with a gradient path if none
        count) and (B, T) fp32 per-position losses, 0 where nothing is counted.
    """
    B, T, D = hidden.shape
    targets, h = shift_labels(labels).reshape(-1), hidden.reshape(-1, D)
    count = (targets != IGNORE_INDEX).sum()
    total, parts, chunk_losses = hidden.new_zeros((), dtype=torch.float32), [], _chunk_fn(head, hidden)
    for start in range(0, B * T, chunk_size):
        end = min(start + chunk_size, B * T)
        part = chunk_losses(head, h[start:end], targets[start:end], range(start, end))
        total, parts = total + part.sum(), parts + [part]
    # a copy (B*T floats), not a view of the concatenation: FSDP2 warns when a model returns a view
    # (an in-place op on it would skip the pre-backward hook that gathers the shards)
    return total / count.clamp_min(1), torch.cat(parts).view(B, T).clone()


def causal_lm_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal LM's loss: padding (``attention_mask`` 0) never counts, whatever the labels say.
    Returns ``(mean, token_loss (B, T))`` as :func:`chunked_cross_entropy`."""
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, -labels.shape[1] :] == 0, IGNORE_INDEX)
    return chunked_cross_entropy(head, hidden, labels, chunk_size=chunk_size)


def sample_losses(token_loss: torch.Tensor) -> torch.Tensor:
    """(B,) summed cross-entropy per sample (the negative log-likelihood of its counted tokens)."""
    return token_loss.sum(dim=1)


# --- router load balancing -----------------------------------------------------------------------
def load_balancing_loss(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss over all MoE layers, padding excluded.

    ``E * sum_e f_e * P_e`` with f_e = routed rows to e / tokens and P_e = mean probability of e,
    both pooled over layers - the same value transformers returns as ``aux_loss``. The counts are
    :attr:`RouterStats.loss_counts` (a router may define the loss on other choices than its routing).
    """
    counts = torch.stack([s.loss_counts for s in stats]).sum(0)
    probs = torch.stack([s.prob_sum for s in stats]).sum(0)
    tokens = torch.stack([torch.as_tensor(s.tokens, device=counts.device) for s in stats]).sum().clamp_min(1)
    return num_experts * torch.sum((counts / tokens) * (probs / tokens))


def sample_router_sums(stats: RouterStats, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's routing sums per sample: counts (B, E), probability sums (B, E) and tokens (B,),
    padding excluded, from its per-token routing (``stats.routing``). The counts are the load-balancing
    loss's (``routing.aux_experts`` where the router gives them), as ``RouterStats.loss_counts``."""
    routing = stats.routing
    if routing is None:
        raise ValueError("these router stats carry no per-token routing (sums of several batches cannot be split)")
    experts = routing.experts if routing.aux_experts is None else routing.aux_experts
    probs, (N, k) = routing.probs, experts.shape
    E = probs.shape[1]
    sample = torch.arange(batch_size, device=probs.device).repeat_interleave(N // batch_size)
    m = probs.new_ones(N) if stats.token_mask is None else stats.token_mask.to(probs.dtype)
    flat = sample.repeat_interleave(k) * E + experts.reshape(-1)
    counts = probs.new_zeros(batch_size * E).index_add(0, flat, m.repeat_interleave(k)).view(batch_size, E)
    prob_sum = probs.new_zeros(batch_size, E).index_add(0, sample, probs * m[:, None])
    return counts, prob_sum, probs.new_zeros(batch_size).index_add(0, sample, m)


def router_stats_of_samples(stats: list[RouterStats], samples: torch.Tensor, batch_size: int) -> list[RouterStats]:
    """Each layer's routing sums over the tokens of ``samples`` (indices into the batch of
    ``batch_size``) only: what those samples alone would have routed."""
    out = []
    for s in stats:
        counts, probs, tokens = sample_router_sums(s, batch_size)
        mine = RouterStats(counts=counts[samples].sum(0), prob_sum=probs[samples].sum(0), tokens=tokens[samples].sum())
        out.append(mine)
    return out
