"""The chunked cross-entropy against PyTorch's on full logits: losses and the hidden states' gradient,
through every path (fused gradient-in-forward, checkpointed for a training head, plain without grad)
and with the fused path's rows split into several blocks."""

import pytest
import torch
import torch.nn.functional as F

from moetune.model import loss as loss_module
from moetune.model.loss import IGNORE_INDEX, chunked_cross_entropy, shift_labels

V, D = 96, 16


def _case(dtype, head_trains):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(D, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) / 2)
    head.weight.requires_grad_(head_trains)
    hidden = torch.randn(3, 11, D, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (3, 11), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a sample with nothing counted
    return head, hidden, labels


def _reference(head, hidden, labels):
    logits = head(hidden.reshape(-1, D)).float()
    per_token = F.cross_entropy(logits, shift_labels(labels).reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum() / (shift_labels(labels) != IGNORE_INDEX).sum(), per_token.view(labels.shape)


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("block_rows", [1, 4, None])  # None: one block per chunk
def test_losses_and_hidden_gradient_equal_cross_entropy(monkeypatch, head_trains, block_rows):
    if block_rows is not None:
        monkeypatch.setattr(loss_module, "_block_bytes", lambda _device: block_rows * 4 * V)
    head, hidden, labels = _case(torch.float32, head_trains)
    mean, token_loss = chunked_cross_entropy(head, hidden, labels, chunk_size=7)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(mean + (token_loss * weights).sum(), hidden)

    ref_mean, ref_tokens = _reference(head, hidden, labels)
    (ref_grad,) = torch.autograd.grad(ref_mean + (ref_tokens * weights).sum(), hidden)
    errors = [(mean - ref_mean).abs(), (token_loss - ref_tokens).abs().max(), (grad - ref_grad).abs().max()]
    print(f"block rows {block_rows}, head trains {head_trains}: " + ", ".join(f"{e.item():.1e}" for e in errors))
    ulps = 4 * torch.finfo(torch.float32).eps * max(1.0, ref_tokens.abs().max().item())  # chunked vs whole matmuls
    assert max(e.item() for e in errors) <= ulps
    assert token_loss[2].abs().max() == 0 and token_loss[0, :3].abs().max() == 0


def test_bf16_head_gives_fp32_losses_and_the_gradient_in_its_dtype(monkeypatch):
    monkeypatch.setattr(loss_module, "_block_bytes", lambda _device: 2 * 4 * V)
    head, hidden, labels = _case(torch.bfloat16, head_trains=False)
    mean, token_loss = chunked_cross_entropy(head, hidden, labels, chunk_size=7)
    (grad,) = torch.autograd.grad(mean, hidden)
    ref_mean, ref_tokens = _reference(head, hidden, labels)
    (ref_grad,) = torch.autograd.grad(ref_mean, hidden)
    assert token_loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert (token_loss - ref_tokens).abs().max() <= 1e-5  # same fp32 arithmetic on the same bf16 logits
    assert (grad.float() - ref_grad.float()).abs().max() <= 2 * ref_grad.float().abs().max() * 2**-8  # bf16 rounding


def test_no_grad_path_equals_the_fused_one():
    head, hidden, labels = _case(torch.float32, head_trains=False)
    with torch.no_grad():
        plain, plain_tokens = chunked_cross_entropy(head, hidden, labels, chunk_size=5)
    fused, fused_tokens = chunked_cross_entropy(head, hidden, labels, chunk_size=5)
    # PyTorch's cross_entropy there, our log-sum-exp here: the same value to an ulp or two
    assert (plain_tokens - fused_tokens.detach()).abs().max() <= 1e-6 and (plain - fused.detach()).abs() <= 1e-6
