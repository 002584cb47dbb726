"""The preference objectives equal TRL's own code (DPOTrainer, KTOTrainer, experimental CPOTrainer /
ORPOTrainer) on the same policy and reference log-probabilities: loss values and gradients.

TRL's trainers compute their losses inside methods that read a few attributes of the trainer and
call the model; the tests call those methods unbound, with a stand-in trainer holding the
options and a stand-in model returning the given per-token log-probs, so TRL's code runs as is.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from moetune.train.preference_losses import (
    dpo_losses,
    ipo_losses,
    kto_losses,
    kto_reference_point,
    orpo_losses,
    simpo_losses,
)

trl = pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

B, T = 4, 9
TOL = 1e-6


class Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


def trainer(**options):
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return SimpleNamespace(**{**base, **options})


def model_returning(table):
    """A stand-in model: the per-token log-probs of the rows it is given (looked up by input_ids)."""

    def forward(*, input_ids, **_):
        logps = table[id(input_ids)]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(
            log_probs=logps, aux_loss=None, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), logits=None
        )

    return forward


def inputs(rows: int, seed: int):
    """Per-token log-probs (a leaf, zero off the completion), completion mask, input ids."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for i in range(rows):
        start = int(torch.randint(2, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[i, start:end] = 1
    per_token = (-3 * torch.rand(rows, T - 1, generator=g, dtype=torch.float64) * mask[:, 1:]).float()
    per_token.requires_grad_(True)
    ids = torch.randint(0, 50, (rows, T), generator=g)
    return per_token, mask, ids


def sums(per_token, mask):
    """What moetune's forward gives: summed completion log-probs and completion token counts."""
    return (per_token * mask[:, 1:]).sum(-1), mask[:, 1:].sum(-1).float()


def close(ours, theirs, leaf, mask):
    """Equal losses, and equal gradients on the completion tokens' log-probs (TRL's fused head
    gives 0 elsewhere and sums every position; moetune counts only the completion)."""
    (g1,) = torch.autograd.grad(ours, leaf, retain_graph=True)
    (g2,) = torch.autograd.grad(theirs, leaf)
    keep = mask[:, 1:].bool()
    g1, g2 = g1[keep], g2[keep]
    loss_err, grad_err = (ours - theirs).abs().item(), (g1 - g2).abs().max().item()
    print(f"max abs error: loss {loss_err:.2e}, gradient {grad_err:.2e}")
    assert loss_err <= TOL and grad_err <= TOL, (loss_err, grad_err)
    assert g1.abs().sum() > 0
    return loss_err, grad_err


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer(kind):
    per_token, mask, ids = inputs(2 * B, seed=1)
    reference = -3 * torch.rand(2 * B) - 20
    beta = 0.3
    policy, tokens = sums(per_token, mask)
    if kind == "dpo":
        ours = dpo_losses(policy.view(2, B), reference.view(2, B), beta=beta)[0].mean()
    else:
        ours = ipo_losses(policy.view(2, B), reference.view(2, B), tokens.view(2, B), beta=beta)[0].mean()
    options = dict(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid" if kind == "dpo" else "ipo"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
    )
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": mask,
        "ref_chosen_logps": reference[:B],
        "ref_rejected_logps": reference[B:],
    }
    theirs = DPOTrainer._compute_loss(trainer(**options), model_returning({id(ids): per_token}), batch, False)
    close(ours, theirs, per_token, mask)


def test_simpo_equals_trl_cpo_trainer():
    per_token, mask, _ = inputs(2 * B, seed=2)
    beta, gamma, smoothing = 2.0, 0.7, 0.1
    policy, tokens = sums(per_token, mask)
    ours = simpo_losses(policy.view(2, B), tokens.view(2, B), beta=beta, gamma=gamma, label_smoothing=smoothing)
    options = dict(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=smoothing)
    average = policy / tokens  # CPOTrainer.get_batch_logps(average_log_prob=True) of the same tokens
    losses, chosen, rejected = CPOTrainer.cpo_loss(trainer(**options), average[:B], average[B:])
    close(ours[0].mean(), losses.mean(), per_token, mask)
    assert torch.allclose(ours[1], chosen) and torch.allclose(ours[2], rejected)


def test_orpo_equals_trl_orpo_trainer():
    per_token, mask, _ = inputs(2 * B, seed=3)
    beta = 0.25
    policy, tokens = sums(per_token, mask)
    nll = -policy[:B].sum() / tokens[:B].sum()
    ours = orpo_losses(policy.view(2, B), tokens.view(2, B), nll, beta=beta)
    average = policy / tokens
    losses, chosen, rejected, _, _ = ORPOTrainer.odds_ratio_loss(trainer(beta=beta), average[:B], average[B:])
    # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean()
    close(ours[0].mean(), nll - losses.mean(), per_token, mask)
    assert torch.allclose(ours[1], chosen) and torch.allclose(ours[2], rejected)


@pytest.mark.parametrize("shift", [0.0, 5.0])  # z clamped at 0, and z > 0
def test_kto_equals_trl_kto_trainer(shift):
    per_token, mask, ids = inputs(2 * B, seed=4)
    kl_per_token, kl_mask, kl_ids = inputs(2 * B, seed=5)
    label = torch.tensor([True, False, True, True, False, False, True, False])
    reference = -3 * torch.rand(2 * B) - 10
    reference_kl = (kl_per_token.detach() * kl_mask[:, 1:]).sum(-1) - shift
    options = dict(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.2)
    options.update(desirable_weight=1.3, undesirable_weight=0.8)
    stand_in = trainer(**options)
    stand_in._compute_kl_logps = KTOTrainer._compute_kl_logps.__get__(stand_in)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": kl_mask,
        "label": label,
        "ref_logps": reference,
        "ref_KL_logps": reference_kl,
    }
    model = model_returning({id(ids): per_token, id(kl_ids): kl_per_token})
    theirs = KTOTrainer._compute_loss(stand_in, model, batch, False)
    policy, _ = sums(per_token, mask)
    policy_kl, _ = sums(kl_per_token.detach(), kl_mask)
    z = kto_reference_point(policy_kl, reference_kl, lambda value: value)
    assert (z > 0) == (shift > 0)
    ours = kto_losses(policy, reference, label, z, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)[0].mean()
    close(ours, theirs, per_token, mask)
