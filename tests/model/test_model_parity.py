"""Our models vs transformers on tiny random checkpoints saved by transformers itself."""

import pytest
import torch

import moetune
from tiny_hf import CASES, padded_batch, save_hf_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
    hf = save_hf_model(name, tmp_path)
    ours = moetune.load_model(tmp_path, dtype=torch.float32)
    ids, mask = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
        ref_pad = hf(input_ids=ids, attention_mask=mask).logits
        got_pad = ours(ids, attention_mask=mask).logits
    err = (ref - got).abs().max().item()
    real = mask.bool()
    err_pad = (ref_pad[real] - got_pad[real]).abs().max().item()
    print(f"{name}: max|dlogits| no pad {err:.2e}, padded {err_pad:.2e}, logit scale {ref.abs().max():.2f}")
    assert err <= 1e-4
    assert err_pad <= 1e-4


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_aux_loss_matches_transformers(name, tmp_path):
    hf = save_hf_model(name, tmp_path)
    ours = moetune.load_model(tmp_path)
    ids, mask = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
        got = ours(ids, attention_mask=mask).aux_loss
    assert torch.allclose(ref.float(), got, atol=1e-5), (ref, got)


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "qwen2_moe"])
def test_loss_matches_transformers(name, tmp_path):
    hf = save_hf_model(name, tmp_path)
    ours = moetune.load_model(tmp_path)
    ours.loss_chunk_size = 7  # force several chunks
    ids, mask = padded_batch(hf.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    labels[1, 4] = -100  # first real token after left padding: a pad position would predict it
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = ours(ids, attention_mask=mask, labels=labels)
    assert got.logits is None
    assert abs(ref.item() - got.loss.item()) < 1e-5


def test_outputs_that_take_a_gradient_are_not_views(tmp_path):
    """FSDP2 hooks a root module's outputs for backward and warns on a view (an in-place op on it would
    skip the hook): what a training forward returns with a gradient must not be one."""
    save_hf_model("qwen3_moe", tmp_path)
    ours = moetune.load_model(tmp_path).train()
    ours.loss_chunk_size = 7  # several chunks, concatenated
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    out = ours(ids, labels=ids)
    tensors = {"loss": out.loss, "token_loss": out.token_loss, "aux_loss": out.aux_loss}
    assert all(t.requires_grad for t in tensors.values())
    assert {name for name, t in tensors.items() if t._base is not None} == set()
