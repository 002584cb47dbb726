"""LoRA on gpt-oss (attention, biased interleaved experts, LM head) vs the real ``peft`` on transformers'
GptOssForCausalLM; adapter files both ways; the experts' biases stay frozen."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune.errors import AdapterError
from moetune.model.hf import to_checkpoint
from moetune.peft.core.params import trainable_parameters
from peft_parity import check_files_both_ways, check_logits_match_peft, check_mixed_adapters_per_sample
from peft_parity import check_peft_reads, linear_grad_gap, logits, peft_model_with, peft_state, randomise, sample_ids
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


def _ours(base, targets=(*ATTN, "experts", "lm_head")):
    model = moetune.load_model(base)
    moetune.add_adapter(model, moetune.LoraConfig(r=R, alpha=ALPHA, target_modules=list(targets)))
    randomise(model)
    return model


def _peft_model(state):
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[*ATTN, "lm_head"], target_parameters=PEFT_PARAMS)
    return peft_model_with(make_hf(), config, state)


def test_lora_matches_peft_logits_grads_and_expert_delta(base):
    """LoRA everywhere vs PEFT: logits, the linears' gradients, PEFT's own expert deltas; expert biases frozen."""
    ours = _ours(base)
    pm = _peft_model(peft_state(ours))
    ids = sample_ids()
    check_logits_match_peft("gpt_oss LoRA (q,k,v,o + routed experts + lm_head)", pm, ours, ids)

    # PEFT's own delta on transformers' (E, D, 2F) interleaved gate_up_proj is ours, transposed and interleaved
    wrapper = pm.base_model.model.model.layers[1].mlp.experts
    inner = wrapper.base_layer  # gate_up_proj's ParamWrapper (down_proj's is outside it)
    assert inner.parameter_name == "gate_up_proj" and wrapper.parameter_name == "down_proj"
    mine = ours.model.layers[1].mlp.experts
    for peft_layer, pair, layout in ((inner, "gate_up", "interleaved_transposed"), (wrapper, "down", "transposed")):
        expected = to_checkpoint(mine.delta("default", pair), layout)
        assert torch.allclose(peft_layer.get_delta_weight("default"), expected, atol=1e-6), pair

    worst, _ = linear_grad_gap(ours, pm, ids)  # the linears; the experts' pairs: through logits and deltas
    experts = ours.model.layers[0].mlp.experts.base_layer  # the experts' biases stay frozen
    assert not any("bias" in k for k in trainable_parameters(ours))
    assert experts.gate_up_proj_bias.grad is None and experts.down_proj_bias.grad is None
    assert not experts.gate_up_proj_bias.requires_grad and not experts.down_proj_bias.requires_grad
    print(f"gpt_oss: linear adapters' max relative grad diff vs PEFT {worst:.2e}")
    assert worst <= 1e-4


def test_adapter_files_both_ways(base, tmp_path):
    """Ours -> PeftModel.from_pretrained, and PEFT's save_pretrained -> moetune.load_adapter."""
    check_files_both_ways(
        "gpt_oss", base, tmp_path, ours=lambda: _ours(base), make_hf=make_hf, theirs=_peft_model, noise=0.05
    )


def test_mixed_adapters_per_sample(base):
    check_mixed_adapters_per_sample(_ours(base), moetune.LoraConfig(r=2, alpha=2, target_modules=["experts", "q_proj"]))


def test_merge_folds_into_the_biased_experts(base):
    ours = _ours(base)
    ids = sample_ids()
    unmerged = logits(ours, ids)
    moetune.merge_adapter(ours)
    err = (logits(ours, ids) - unmerged).abs().max().item()
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
    _, ids = check_peft_reads(f"gpt_oss {targets}", ours, make_hf(), out)
    back = moetune.load_model(base)
    moetune.load_adapter(back, out)
    assert (logits(back, ids) - logits(ours, ids)).abs().max() <= 1e-6
