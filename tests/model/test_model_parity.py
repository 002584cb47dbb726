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
