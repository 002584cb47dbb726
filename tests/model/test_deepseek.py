"""DeepSeek-V2/V3 (MLA + group-limited routing) vs transformers on tiny random checkpoints."""

import pytest
import torch

import moetune
from moetune.model import KVCache
from moetune.model.deepseek import DeepSeekRouter

from tiny_deepseek import CASES, make_hf
from tiny_hf import padded_batch

transformers = pytest.importorskip("transformers")


def _max_diffs(hf, ours):
    ids, mask = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        err = (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item()
        ref_pad, got_pad = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    real = mask.bool()
    return err, (ref_pad[real] - got_pad[real]).abs().max().item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    ours = moetune.load_model(tmp_path, dtype=torch.float32)
    err, err_pad = _max_diffs(hf, ours)
    print(f"{name}: max|dlogits| no pad {err:.2e}, padded {err_pad:.2e}")
    assert err <= 1e-4 and err_pad <= 1e-4


def test_routing_is_exercised(tmp_path):
    """The parity case really routes tokens differently, and the bias really changes selection."""
    hf = make_hf("v3_groups_yarn")
    hf.save_pretrained(tmp_path)
    ours = moetune.load_model(tmp_path)
    ids, _ = padded_batch(hf.config.vocab_size)
    moe = ours.model.layers[1].mlp
    h = torch.randn(36, 64)
    with torch.no_grad():
        chosen = {tuple(sorted(r.tolist())) for r in moe.gate(h).experts}
        assert len(chosen) > 5
        before = ours(ids).logits
        for layer in ours.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.zero_()
        assert (ours(ids).logits - before).abs().max() > 1e-3


def test_names_match_transformers(tmp_path):
    """Module paths equal transformers' (so LoRA targets and PEFT adapter keys line up)."""
    for name in ("v3_groups_yarn", "v2_lite_greedy"):
        hf = make_hf(name)
        hf.save_pretrained(tmp_path / name)
        ours = moetune.load_model(tmp_path / name)
        hf_names = {n for n, _ in hf.named_parameters()} | {n for n, _ in hf.named_buffers() if "bias" in n}
        assert {n for n, _ in ours.named_parameters()} == hf_names


@pytest.mark.parametrize("name", ["v3_groups_yarn", "v2_groups_yarn"])
def test_save_pretrained_round_trip(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = moetune.load_model(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, type(hf).__name__).from_pretrained(tmp_path / "ours").eval()
    back.config._attn_implementation = "sdpa"
    ids, _ = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        err = (back(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    print(f"{name}: round trip max|dlogits| {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("name", ["v3_groups_yarn", "v2_lite_greedy"])
def test_latent_kv_cache_matches_full_forward(name, tmp_path):
    make_hf(name).save_pretrained(tmp_path)
    ours = moetune.load_model(tmp_path)
    ids, _ = padded_batch(128)
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache()
        steps = [ours(ids[:, :7], cache=cache).logits]
        steps += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(7, ids.shape[1])]
    assert cache.layers[0][0].shape == (3, 1, 12, 16)  # the compressed latent is what is cached
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_bias_update_moves_toward_balance():
    torch.manual_seed(0)
    router = DeepSeekRouter(
        dim=32,
        num_experts=8,
        top_k=2,
        scoring="sigmoid",
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        correction_bias=True,
    )
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.weight[0] += 0.5  # make expert 0 popular
    x = torch.randn(512, 32) + 0.5

    def load():
        return torch.bincount(router(x).experts.reshape(-1), minlength=8).float()

    start = load()
    delta = router.update_correction_bias(start, speed=0.01)
    assert delta[start.argmax()] < 0 and delta[start.argmin()] > 0  # overloaded down, underloaded up
    for _ in range(200):
        router.update_correction_bias(load(), speed=0.01)
    end = load()
    print(f"load std {start.std():.1f} -> {end.std():.1f}")
    assert end.std() < 0.5 * start.std()


def test_bias_update_from_forward_stats(tmp_path):
    make_hf("v3_groups_yarn").save_pretrained(tmp_path)
    ours = moetune.load_model(tmp_path)
    ids, mask = padded_batch(128)
    out = ours(ids, attention_mask=mask)
    assert torch.isfinite(out.aux_loss)
    assert ours.update_router_biases(out.router_stats, speed=1e-3) == 2
    bias = ours.model.layers[1].mlp.gate.e_score_correction_bias
    assert not bias.requires_grad and bias.grad is None


def test_correction_bias_stays_fp32():
    router = DeepSeekRouter(dim=16, num_experts=4, top_k=1, scoring="sigmoid", correction_bias=True)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([1e-4, 0.1234567, -0.3, 0.0]))
    exact = router.e_score_correction_bias.clone()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, exact)


def test_softmax_router_has_no_bias():
    router = DeepSeekRouter(dim=16, num_experts=4, top_k=1)
    assert "e_score_correction_bias" not in dict(router.named_parameters())
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        router.update_correction_bias(torch.ones(4), 0.1)


def test_bad_group_config_is_a_clear_error(tmp_path):
    from moetune.errors import CheckpointError
    from moetune.model import model_args_from_hf

    cfg = make_hf("v3_groups_yarn").config.to_dict()
    with pytest.raises(CheckpointError, match="n_group=3"):
        model_args_from_hf({**cfg, "n_group": 3})
    with pytest.raises(CheckpointError, match="topk_method='noaux_tc'"):
        model_args_from_hf({**make_hf("v2_lite_greedy").config.to_dict(), "topk_method": "noaux_tc"})


def test_v3_multi_token_prediction_layer_is_skipped(tmp_path):
    """V3 checkpoints carry num_nextn_predict_layers MTP modules after the decoder layers (layer 61
    of the 61-layer release); they are skipped by that rule, not by a fixed index. V2 has none."""
    from safetensors.torch import save_file

    from moetune.errors import CheckpointError

    for name, ok in (("v3_groups_yarn", True), ("v2_lite_greedy", False)):
        folder = tmp_path / name
        hf = make_hf(name)
        hf.save_pretrained(folder)
        mtp = f"model.layers.{hf.config.num_hidden_layers}.eh_proj.weight"
        save_file({mtp: torch.zeros(4, 4)}, str(folder / "mtp.safetensors"))
        if ok:
            moetune.load_model(folder)
            save_file({"model.layers.61.eh_proj.weight": torch.zeros(4, 4)}, str(folder / "mtp.safetensors"))
        with pytest.raises(CheckpointError, match=r"model\.layers\.\d+\.eh_proj\.weight"):
            moetune.load_model(folder)
