"""Row movement of the MoE dispatch: the permutation back to token order is exact both ways."""

import torch

from moetune.model.dispatch import combine, dispatch, permute_rows


def test_permute_rows_equals_scatter_assignment_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(24, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(24, generator=gen)
    upstream = torch.randn(24, 5, generator=gen, dtype=torch.float64)

    reference = torch.empty_like(rows)
    reference[order] = rows
    (want,) = torch.autograd.grad(reference, rows, upstream)

    out = permute_rows(rows, order)
    (got,) = torch.autograd.grad(out, rows, upstream)
    assert torch.equal(out, reference)
    assert torch.equal(got, want)
    assert torch.autograd.gradcheck(lambda r: permute_rows(r, order), (rows,))


def test_combine_sums_each_tokens_weighted_rows_in_choice_order():
    gen = torch.Generator().manual_seed(1)
    N, k, E, D = 7, 3, 4, 6
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    weights = torch.rand(N, k, generator=gen)
    per_choice = torch.randn(N, k, D, generator=gen)  # output of choice j of token n
    d = dispatch(experts, E)
    sorted_rows = per_choice.reshape(N * k, D)[d.order]
    want = (per_choice * weights.unsqueeze(-1)).sum(dim=1)
    assert torch.equal(combine(sorted_rows, d, weights), want)
