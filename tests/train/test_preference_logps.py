"""Sequence log-probs of the preference objectives: the policy equals transformers + PEFT on the same
model and adapter, the reference (every adapter off) equals the base loaded without any adapter,
and the reference is the same parameters, not a second copy of the base."""

from __future__ import annotations

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import moetune
from moetune.config.preference import PreferenceSection
from moetune.data.examples import IGNORE, Example
from moetune.data.preference import PreferenceCollator, PreferenceExample
from moetune.peft.core.params import trainable_parameters
from moetune.train.logps import sequence_logps
from moetune.train.preference import PreferenceObjective
from tiny_hf import make_hf_model, save_hf_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["q_proj", "v_proj", "experts"]


def _example(g: torch.Generator, prompt: int, completion: int) -> Example:
    ids = torch.randint(0, 128, (prompt + completion,), generator=g).tolist()
    return Example(ids, [IGNORE] * prompt + ids[prompt:])


def _batch(pairs: int = 3) -> dict[str, torch.Tensor]:
    """Pairs of different prompt and completion lengths (so rows are padded)."""
    g = torch.Generator().manual_seed(7)
    examples = []
    for i in range(pairs):
        prompt = 3 + i
        examples.append(PreferenceExample(_example(g, prompt, 4 + 2 * i), _example(g, prompt, 6 - i), index=i))
    return PreferenceCollator(pad_id=0)([[e] for e in examples])


def _hf_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs from a transformers model's logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * keep).sum(-1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our model with a random LoRA (attention and experts), and transformers + PEFT reading its file."""
    root = tmp_path_factory.mktemp("logps")
    save_hf_model("qwen3_moe", root / "base")
    ours = moetune.load_model(root / "base")
    moetune.add_adapter(ours, moetune.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(ours).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = moetune.save_adapter(ours, root / "adapter")
    theirs = peft.PeftModel.from_pretrained(make_hf_model("qwen3_moe"), str(folder)).eval()
    return root, ours.eval(), theirs


def _objective(model) -> PreferenceObjective:
    return PreferenceObjective(model, "default", kind="dpo", options=PreferenceSection(beta=0.1))


def test_policy_logps_equal_transformers_peft(models):
    _, ours, theirs = models
    batch = _batch()
    with torch.no_grad():
        policy, tokens, _ = _objective(ours).logps(batch)
    expected = _hf_logps(theirs, batch)
    err = (policy.double() - expected).abs().max().item()
    print(f"policy sequence log-probs vs transformers + PEFT: max abs error {err:.2e}")
    assert err <= 1e-5
    assert tokens.tolist() == (batch["labels"][:, 1:] != IGNORE).sum(-1).tolist()
    with theirs.disable_adapter():
        assert (expected - _hf_logps(theirs, batch)).abs().max() > 1e-2  # the adapter matters


def test_reference_equals_base_without_adapter(models):
    root, ours, theirs = models
    batch = _batch()
    reference = _objective(ours).reference_logps(batch, train=False)
    fresh = moetune.load_model(root / "base").eval()  # the base, loaded without any adapter
    with torch.no_grad():
        base = sequence_logps(fresh, batch)[0]
    err = (reference - base).abs().max().item()
    hf_err = (reference.double() - _hf_logps(make_hf_model("qwen3_moe"), batch)).abs().max().item()
    with theirs.disable_adapter():
        peft_err = (reference.double() - _hf_logps(theirs, batch)).abs().max().item()
    print(f"reference vs base without adapter: {err:.2e} (moetune), {hf_err:.2e} (transformers), {peft_err:.2e} (PEFT)")
    assert err <= 1e-6 and hf_err <= 1e-5 and peft_err <= 1e-5


def _tensor_bytes() -> int:
    """Bytes of every live tensor's storage (each storage once)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        # fake tensors (torch.compile's caches, from earlier tests in the process) hold no memory
        if isinstance(obj, torch.Tensor) and not obj.is_meta and not isinstance(obj, FakeTensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _models() -> set[int]:
    gc.collect()
    return {id(m) for m in gc.get_objects() if isinstance(m, torch.nn.Module) and hasattr(m, "lm_head")}


def test_reference_is_the_same_parameters_not_a_copy(models):
    root, _, _ = models
    model = moetune.load_model(root / "base")
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    params = {id(p): p.data_ptr() for p in model.parameters()}
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch, objective = _batch(), _objective(model)
    models_before = _models()
    before = _tensor_bytes()
    reference = objective.reference_logps(batch, train=False)
    grown = _tensor_bytes() - before
    assert {id(p): p.data_ptr() for p in model.parameters()} == params  # nothing re-allocated or copied
    print(f"model {base_bytes} bytes; live tensor bytes grew by {grown} after the reference forward")
    assert grown < base_bytes / 100  # a second copy of the base would add base_bytes
    assert _models() == models_before  # no model was built for the reference
    assert reference.shape == (6,) and not reference.requires_grad
