"""LoRA on gpt-oss (attention, biased interleaved experts, LM head) vs the real ``peft`` on transformers'
GptOssForCausalLM; adapter files both ways; the experts' biases stay frozen."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune.errors import AdapterError
from moetune.model.hf import to_checkpoint
from moetune.peft.core.layer import adapter_layers
from moetune.peft.core.params import trainable_parameters
from tiny_gpt_oss import make_hf

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# PEFT reaches transformers' fused (E, D, 2F) / (E, F, D) expert tensors through target_parameters.
PEFT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss_lora") / "base"
    make_hf().save_pretrained(folder)
    return folder


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return (model(ids) if isinstance(model, moetune.CausalLM) else model(input_ids=ids)).logits


def _randomise(model, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _ours(base, targets=(*ATTN, "experts", "lm_head")):
    model = moetune.load_model(base)
    moetune.add_adapter(model, moetune.LoraConfig(r=R, alpha=ALPHA, target_modules=list(targets)))
    _randomise(model)
    return model


def _peft_model(state):
    pm = peft.get_peft_model(
        make_hf(),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[*ATTN, "lm_head"], target_parameters=PEFT_PARAMS),
    ).eval()
    result = peft.set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    assert sum("lora_" in k for k, _ in pm.named_parameters()) == len(state)  # every PEFT tensor set from ours
    return pm


def _peft_state(model):
    return {
        f"base_model.model.{path}.{k}": v
        for path, layer in adapter_layers(model)
        for k, v in layer.peft_tensors("default").items()
    }


def test_lora_matches_peft_logits_grads_and_expert_delta(base):
    """LoRA everywhere vs PEFT: logits, the linears' gradients, PEFT's own expert deltas; expert biases frozen."""
    ours = _ours(base)
    pm = _peft_model(_peft_state(ours))
    ids = _ids()
    ref, got = _logits(pm, ids), _logits(ours, ids)
    with pm.disable_adapter():
        effect = (ref - _logits(pm, ids)).abs().max().item()
    err = (ref - got).abs().max().item()
    print(f"gpt_oss LoRA (q,k,v,o + routed experts + lm_head) vs PEFT: max|dlogits| {err:.2e}, effect {effect:.2f}")
    assert err <= 1e-5 and effect > 1e-1

    # PEFT's own delta on transformers' (E, D, 2F) interleaved gate_up_proj is ours, transposed and interleaved
    wrapper = pm.base_model.model.model.layers[1].mlp.experts
    inner = wrapper.base_layer  # gate_up_proj's ParamWrapper (down_proj's is outside it)
    assert inner.parameter_name == "gate_up_proj" and wrapper.parameter_name == "down_proj"
    mine = ours.model.layers[1].mlp.experts
    for peft_layer, pair, layout in ((inner, "gate_up", "interleaved_transposed"), (wrapper, "down", "transposed")):
        expected = to_checkpoint(mine.delta("default", pair), layout)
        assert torch.allclose(peft_layer.get_delta_weight("default"), expected, atol=1e-6), pair

    ours.train(), pm.train()
    ours(ids, labels=ids).loss.backward()
    pm(input_ids=ids, labels=ids).loss.backward()
    experts = ours.model.layers[0].mlp.experts.base_layer  # the experts' biases stay frozen
    assert not any("bias" in k for k in trainable_parameters(ours))
    assert experts.gate_up_proj_bias.grad is None and experts.down_proj_bias.grad is None
    assert not experts.gate_up_proj_bias.requires_grad and not experts.down_proj_bias.requires_grad
    theirs, worst = dict(pm.named_parameters()), 0.0
    for key, p in trainable_parameters(ours).items():
        path, kind, name = key.rsplit(".", 2)
        peer = theirs.get(f"base_model.model.{path}.{kind}.{name}.weight")
        if peer is not None:  # the linears; the experts' pairs are compared through logits and deltas
            worst = max(worst, ((p.grad - peer.grad).abs().max() / peer.grad.abs().max()).item())
    print(f"gpt_oss: linear adapters' max relative grad diff vs PEFT {worst:.2e}")
    assert worst <= 1e-4


def test_adapter_files_both_ways(base, tmp_path):
    """Ours -> PeftModel.from_pretrained, and PEFT's save_pretrained -> moetune.load_adapter."""
    ours = _ours(base)
    out = moetune.save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(make_hf(), str(out)).eval()
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    print(f"gpt_oss: moetune.save_adapter -> PeftModel.from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-5

    theirs = _peft_model(_peft_state(_ours(base)))  # a PEFT model with its own (different) adapter
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    back = moetune.load_model(base)
    moetune.load_adapter(back, tmp_path / "peft")
    err = (_logits(theirs, ids) - _logits(back, ids)).abs().max().item()
    print(f"gpt_oss: PeftModel.save_pretrained -> moetune.load_adapter max|dlogits| {err:.2e}")
    assert err <= 1e-5


def test_mixed_adapters_per_sample(base):
    ours = _ours(base)
    moetune.add_adapter(ours, moetune.LoraConfig(r=2, alpha=2, target_modules=["experts", "q_proj"]), name="other")
    _randomise(ours, seed=9)
    ids = _ids()
    with torch.no_grad():
        alone = {n: ours(ids, adapter_names=[n, n]).logits for n in ("default", "other")}
        mixed = ours(ids, adapter_names=["default", "other"]).logits
    assert (mixed[0] - alone["default"][0]).abs().max() <= 1e-5
    assert (mixed[1] - alone["other"][1]).abs().max() <= 1e-5


def test_merge_folds_into_the_biased_experts(base):
    ours = _ours(base)
    ids = _ids()
    unmerged = _logits(ours, ids)
    moetune.merge_adapter(ours)
    err = (_logits(ours, ids) - unmerged).abs().max().item()
    print(f"gpt_oss: merged vs unmerged max|dlogits| {err:.2e}")
    assert err <= 1e-4


def test_per_expert_layout_is_refused_and_export_for_vllm_writes_peft(base, tmp_path):
    """vLLM reads gpt-oss expert adapters in PEFT's fused layout only (is_3d_moe_weight): per-expert keys
    would load nowhere, so that layout is refused and ``export --for vllm`` writes PEFT's."""
    from safetensors.torch import load_file

    from moetune.workflows import export_adapter

    ours = _ours(base, targets=["experts", "q_proj"])
    with pytest.raises(AdapterError, match="gpt_oss experts are served from PEFT's fused layout"):
        moetune.save_adapter(ours, tmp_path / "x", layout="per_expert")
    assert not (tmp_path / "x").exists()
    saved = moetune.save_adapter(ours, tmp_path / "a")
    out = export_adapter(base, str(saved), tmp_path / "vllm", reader="vllm")
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert not any(".experts.0." in k for k in keys)
    # vLLM's fused reader asserts a gate_up_proj and a down_proj pair (_stack_moe_lora_weights): refused here
    part = moetune.save_adapter(_ours(base, targets=["experts.down_proj"]), tmp_path / "down")
    with pytest.raises(AdapterError, match="needs both gate_up_proj and down_proj"):
        export_adapter(base, str(part), tmp_path / "vllm_down", reader="vllm")


def test_training_step_has_no_host_sync():
    """Sinks (mask + extra key), the experts' per-row biases (searchsorted) and LoRA: no host waits."""
    from host_syncs import HostSyncCounter
    from moetune.model import build_random_model
    from moetune.tiny_models import tiny_model_args

    model = build_random_model(tiny_model_args("gpt_oss"))
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=[*ATTN, "experts"]))
    ids = torch.randint(0, 200, (2, 24))  # past the tiny model's window of 16
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with HostSyncCounter() as counter:
        out = model(ids, attention_mask=mask, labels=ids)
        (out.loss + out.aux_loss).backward()
    assert not counter.counts, counter.report()


@pytest.mark.parametrize("targets", [["experts.gate_proj", "experts.down_proj"], ["experts.up_proj"]])
def test_one_half_of_gate_up_round_trips_through_peft(base, tmp_path, targets):
    """A gate-only or up-only pair is PEFT's gate_up pair with the other half's rows zero, interleaved."""
    ours = _ours(base, targets=targets)
    out = moetune.save_adapter(ours, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(make_hf(), str(out)).eval()
    ids = _ids()
    err = (_logits(ours, ids) - _logits(pm, ids)).abs().max().item()
    print(f"gpt_oss {targets}: moetune -> PEFT max|dlogits| {err:.2e}")
    assert err <= 1e-5
    back = moetune.load_model(base)
    moetune.load_adapter(back, out)
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max() <= 1e-6
