"""Per-sample adapter selection is peft's context, set by hooks around the model's forward: it is
seen again in backward recomputes, never outlives a forward, and per-sample loss sums come from
the model's per-token outputs through the loss layer."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune import LoraConfig
from moetune.model.loss import load_balancing_loss, router_stats_of_samples, sample_losses
from moetune.peft.core.context import EVERYWHERE, current_context
from moetune.peft.core.layer import adapter_layers, selection_handed
from moetune.peft.core.params import trainable_parameters
from tiny_configs import MOE, tiny_model

TARGETS = ["q_proj", "v_proj", "experts", "lm_head"]


def _model():
    model = tiny_model(MOE)
    for name, r in (("a", 4), ("b", 2)):
        moetune.add_adapter(model, LoraConfig(r=r, target_modules=TARGETS), name=name)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _batch():
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    return ids, mask, labels


def _grads(model, checkpointing: bool):
    model.zero_grad()
    model.set_gradient_checkpointing(checkpointing)
    model.loss_chunk_size = 4  # several LM-head chunks, each recomputed in backward
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels, adapter_names=["b", "a", None])
    (out.loss + 0.1 * out.aux_loss).backward()
    return {k: p.grad.clone() for k, p in trainable_parameters(model).items()}


def test_recomputes_in_backward_see_the_forwards_adapter_selection():
    model = _model().train()
    plain, recomputed = _grads(model, False), _grads(model, True)
    assert current_context() is None
    for k in plain:
        assert torch.allclose(plain[k], recomputed[k], atol=1e-6), k
    assert any(plain[k].abs().sum() > 0 for k in plain if ".b" in k or "_b" in k.lower())


def test_decoder_blocks_hand_their_layers_the_selection_for_the_forward_only():
    """Inside a block the adapter layers read the selection the block's hooks put on them (a compiled
    block reads no ContextVar); outside any forward no layer holds one."""
    model = _model().eval()
    q = model.model.layers[1].self_attn.q_proj
    seen = []
    q.register_forward_pre_hook(lambda m, _args: seen.append(m.installed_selection))
    ids, mask, _ = _batch()
    with torch.no_grad():
        model(ids, attention_mask=mask, adapter_names=["b", None, "b"])
        model(ids)
    assert seen[0].names == {"b"} and seen[0].sample_masks["b"].tolist() == [True, False, True]
    assert seen[0].sample_of_row.tolist() == [i // 9 for i in range(27)]
    assert seen[1].names is None  # no per-sample names: the active adapters everywhere
    assert all(layer.installed_selection is None for _, layer in adapter_layers(model))


def test_a_module_compiled_on_its_own_is_handed_the_selection():
    """What a decoder block's hooks do, for a module that is not a block (bench/moe_block.py)."""
    model = _model().eval()
    experts = model.model.layers[0].mlp.experts
    with selection_handed(experts):
        assert experts.installed_selection is EVERYWHERE  # no forward running: the active adapters everywhere
    assert experts.installed_selection is None


def test_a_failing_forward_leaves_no_context_and_names_must_match_the_batch():
    model = _model().eval()
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 3"):
        model(ids, adapter_names=["a", "b"])
    assert current_context() is None
    with pytest.raises(IndexError):
        model(ids + 1000, attention_mask=mask, adapter_names=["a", "b", None])  # fails inside the forward
    assert current_context() is None


def test_per_sample_sums_equal_each_sample_alone():
    model = _model().eval()
    ids, mask, labels = _batch()
    names = ["b", "a", None]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, adapter_names=names)
        sums = sample_losses(out.token_loss)
        for i, name in enumerate(names):
            one = slice(i, i + 1)
            alone = model(ids[one], attention_mask=mask[one], labels=labels[one], adapter_names=[name])
            counted = int(((labels[i, 1:] != -100) & (mask[i, 1:] != 0)).sum())
            assert abs(float(sums[i]) - float(alone.loss) * counted) < 1e-4, i
            mine = router_stats_of_samples(out.router_stats, torch.tensor([i]), len(names))
            aux = load_balancing_loss(mine, MOE["num_experts"])
            assert abs(float(aux) - float(alone.aux_loss)) < 1e-5, i


def test_an_unknown_adapter_name_is_an_error_not_the_base_model():
    """A misspelt name in adapter_names would run its sample on the base model, silently."""
    model = _model()
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="no adapter named 'c'.*'a', 'b'"):
        model(ids, adapter_names=["a", "c"])
    assert current_context() is None
    model(ids, adapter_names=["a", None])  # None is the base model, by choice
