"""moetune's LoRA against the real ``peft`` on transformers' model of the same checkpoint: sample ids,
logits of either model, random adapter weights, our tensors under PEFT's keys, a PEFT model holding
them, and the checks the family tests share (adapter files both ways, mixed adapters per sample)."""

from __future__ import annotations

from typing import Callable

import torch

import moetune
from moetune.peft.core.layer import adapter_layers
from moetune.peft.core.params import trainable_parameters

# PEFT 0.21 under transformers 5 retargets target_modules entries named gate_proj/up_proj/down_proj to
# the fused routed experts (its v4 -> v5 MoE conversion, on DeepSeek and Qwen3-Next), which would leave
# the dense FFN and shared-expert linears without LoRA: their 2D weights are reached through
# target_parameters instead (the same LoRA, the same keys), with the fused experts' 3D tensors.
PEFT_FFN_PARAMS = [
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
]


def sample_ids(vocab: int = 128, shape: tuple[int, int] = (2, 11), seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    """A moetune model's logits (``kw``: its own arguments, e.g. ``adapter_names``) or a transformers/PEFT one's."""
    with torch.no_grad():
        return (model(ids, **kw) if isinstance(model, moetune.CausalLM) else model(input_ids=ids)).logits


def randomise(model, seed: int = 5, adapter: str | None = None) -> None:
    """Every trainable adapter tensor (of ``adapter`` only, if given) drawn from N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in trainable_parameters(model).items():
            if adapter is None or f".{adapter}" in key or adapter in key.split("."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_state(model, path: Callable[[str], str] = str) -> dict[str, torch.Tensor]:
    """Our ``default`` adapter's tensors under the keys of a PEFT adapter file (adapter name left out);
    ``path`` maps our module path to the one PEFT sees (a multimodal wrapper's)."""
    return {
        f"base_model.model.{path(p)}.{k}": v
        for p, layer in adapter_layers(model)
        for k, v in layer.peft_tensors("default").items()
    }


def peft_model_with(hf, config, state: dict[str, torch.Tensor]):
    """PEFT's model of ``hf`` under ``config`` (a ``peft.LoraConfig``) holding exactly our ``state``."""
    import peft

    pm = peft.get_peft_model(hf, config).eval()
    result = peft.set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    assert sum("lora_" in k for k, _ in pm.named_parameters()) == len(state)  # every PEFT tensor set from ours
    return pm


def check_peft_reads(label: str, model, hf, folder, *, tol: float = 1e-5):
    """``PeftModel.from_pretrained(hf, folder)`` (our saved adapter) gives our logits within ``tol``;
    returns PEFT's model and the ids compared on."""
    import peft

    pm = peft.PeftModel.from_pretrained(hf, str(folder)).eval()
    ids = sample_ids()
    err = (logits(model, ids) - logits(pm, ids)).abs().max().item()
    print(f"{label}: moetune.save_adapter -> PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= tol
    return pm, ids


def check_files_both_ways(label: str, base, tmp_path, *, ours: Callable, make_hf: Callable, theirs: Callable, noise):
    """Ours -> ``PeftModel.from_pretrained``, and PEFT's ``save_pretrained`` -> ``moetune.load_adapter``:
    ``ours()`` a fresh adapted model, ``theirs(state)`` PEFT's model holding a state, ``noise`` the
    scale of what PEFT's adapter adds to ours (so it is its own)."""
    mine = ours()
    _, ids = check_peft_reads(label, mine, make_hf(), moetune.save_adapter(mine, tmp_path / "ours"))
    other = theirs(peft_state(ours()))
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_" in name:
                p.add_(noise * torch.randn_like(p))
    other.save_pretrained(tmp_path / "peft")
    back = moetune.load_model(base)
    moetune.load_adapter(back, tmp_path / "peft")
    err = (logits(other, ids) - logits(back, ids)).abs().max().item()
    print(f"{label}: PeftModel.save_pretrained -> moetune.load_adapter max|dlogits| {err:.2e}")
    assert err <= 1e-5


def check_mixed_adapters_per_sample(model, other: moetune.LoraConfig) -> None:
    """``other`` added beside ``default`` (randomised): a batch mixing the two per sample gives each
    sample what its adapter alone gives."""
    moetune.add_adapter(model, other, name="other")
    randomise(model, seed=9)
    ids = sample_ids()
    with torch.no_grad():
        alone = {n: model(ids, adapter_names=[n, n]).logits for n in ("default", "other")}
        mixed = model(ids, adapter_names=["default", "other"]).logits
    assert (mixed[0] - alone["default"][0]).abs().max() <= 1e-5
    assert (mixed[1] - alone["other"][1]).abs().max() <= 1e-5


def logits_gap(pm, model, ids: torch.Tensor) -> tuple[float, float]:
    """Max |PEFT's logits - ours|, and max |PEFT's logits - its base's| (the adapter's effect, so that
    the first means something)."""
    ref = logits(pm, ids)
    with pm.disable_adapter():
        effect = (ref - logits(pm, ids)).abs().max().item()
    return (ref - logits(model, ids)).abs().max().item(), effect


def check_logits_match_peft(label: str, pm, model, ids: torch.Tensor, *, effect: float = 1e-1) -> None:
    """Our logits within 1e-5 of PEFT's, and PEFT's adapter changing its logits by more than ``effect``."""
    err, changed = logits_gap(pm, model, ids)
    print(f"{label} vs PEFT: max|dlogits| {err:.2e}, adapter effect {changed:.2f}")
    assert err <= 1e-5 and changed > effect


def linear_grad_gap(model, pm, ids: torch.Tensor) -> tuple[float, int]:
    """After one backward of the LM loss on ``ids`` through both: the largest relative difference of our
    adapter gradients from PEFT's tensor of the same name, and how many had one (routed experts and
    PEFT's target_parameters wrappers have none: they are compared through the logits)."""
    model.train(), pm.train()
    model(ids, labels=ids).loss.backward()
    pm(input_ids=ids, labels=ids).loss.backward()
    theirs, worst, compared = dict(pm.named_parameters()), 0.0, 0
    for key, p in trainable_parameters(model).items():
        path, kind, name = key.rsplit(".", 2)
        peer = theirs.get(f"base_model.model.{path}.{kind}.{name}.weight")
        if peer is not None:
            compared += 1
            worst = max(worst, ((p.grad - peer.grad).abs().max() / peer.grad.abs().max().clamp_min(1e-12)).item())
    return worst, compared
