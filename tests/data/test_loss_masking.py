"""Prompt and padding carry no loss; packed examples never attend across their boundary."""

import torch
import torch.nn.functional as F

import moetune
from moetune.data import ByteTokenizer, Collator, tokenize_row
from moetune.data.formats import InstructionRow
from tiny_hf import save_hf_model


def _examples(tok):
    rows = [
        InstructionRow(instruction="copy: abc", output="abc"),
        InstructionRow(instruction="lower: XyZw", output="xyzw"),
    ]
    return [tokenize_row(r, tok, max_length=64) for r in rows]


def _model(tmp_path):
    save_hf_model("qwen3_moe", tmp_path)
    return moetune.load_model(tmp_path)


def test_packed_row_equals_each_example_alone(tmp_path):
    tok, model = ByteTokenizer(), _model(tmp_path)
    ex = _examples(tok)
    packed = Collator(pad_id=tok.pad_id, packing=True)([ex])
    with torch.no_grad():
        got = model(
            packed["input_ids"] % 128,
            attention_mask=packed["attention_mask"],
            position_ids=packed["position_ids"],
            segment_ids=packed["segment_ids"],
        ).logits[0]
        start = 0
        for e in ex:
            alone = model(torch.tensor([e.input_ids]) % 128).logits[0]
            err = (got[start : start + len(e)] - alone).abs().max().item()
            assert err < 1e-5, err
            start += len(e)


def test_prompt_and_padding_carry_no_loss(tmp_path):
    tok, model = ByteTokenizer(), _model(tmp_path)
    batch = Collator(pad_id=tok.pad_id)([[e] for e in _examples(tok)])
    ids, mask, labels = batch["input_ids"] % 128, batch["attention_mask"], batch["labels"] % 128
    labels = torch.where(batch["labels"] == -100, -100, labels)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
        # reference: mean CE over response tokens only, computed by hand
        logits, target = out.logits[:, :-1], labels[:, 1:]
        keep = target != -100
        ref = F.cross_entropy(logits[keep], target[keep])
        assert abs(out.loss.item() - ref.item()) < 1e-6
        # padding inputs never leak into the loss
        ids2 = ids.clone()
        ids2[mask == 0] = 7
        assert abs(model(ids2, attention_mask=mask, labels=labels).loss.item() - out.loss.item()) < 1e-6
    prompt_positions = (batch["labels"] == -100) & (mask == 1)
    assert prompt_positions.sum() > 10  # the test really covers prompt tokens
