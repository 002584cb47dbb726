"""Data pipeline: tokenizers, JSONL shapes and errors, loss masks, packing, collation, sampling."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from moetune.config import DataSection
from moetune.data import (
    IGNORE,
    BatchLoader,
    ByteTokenizer,
    ChatRow,
    Collator,
    Example,
    InstructionRow,
    ResumableSampler,
    SamplerState,
    TextRow,
    build_datasets,
    eval_batches,
    load_rows,
    load_tokenizer,
    make_train_loader,
    pack_examples,
    tokenize_row,
)
from moetune.errors import CheckpointError, DataError
from tokenizer_helpers import CHATML, make_hf_tokenizer, write_jsonl

# Like Qwen3: only the last assistant turn gets a (here empty) think block, so a prefix render is
# not a prefix of the full render; system must come first.
HISTORY_CHANGING = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello wörld"},
    {"role": "assistant", "content": "the quick fox"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "héllo"},
]


def learnt_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE], skip_special_tokens=False)


# ---- tokenizers -------------------------------------------------------------------------------


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo" and tok.vocab_size == 262
    chat = tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert chat.ids == [tok.bos_id, 260, *b"hi", tok.eos_id, 261, *b"yo", tok.eos_id]
    assert [i for i, a in zip(chat.ids, chat.assistant) if a] == [*b"yo", tok.eos_id]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<bos><|user|>hi<eos><|assistant|>"


def test_hf_chat_template_rendering_and_mask(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "tok")))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 4, 0, False)
    text = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert (
        text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello wörld<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    chat = tok.encode_chat(CHAT)
    assert tok.decode(chat.ids, skip_special_tokens=False) == tok.apply_chat_template(CHAT)
    learnt = tok.decode([i for i, a in zip(chat.ids, chat.assistant) if a], skip_special_tokens=False)
    assert learnt == "the quick fox<|im_end|>héllo<|im_end|>"  # never the "\n" after <|im_end|>


def test_hf_chat_template_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = make_hf_tokenizer(tmp_path / "tok")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), chat_template=CHATML
    )
    ours = load_tokenizer(str(folder))
    for prompt in (False, True):
        assert ours.apply_chat_template(CHAT, prompt) == reference.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=prompt
        )


def test_hf_template_that_rewrites_history(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "tok", HISTORY_CHANGING)))
    assert tok.turn_end == "<|im_end|>"
    chat = tok.encode_chat(CHAT)
    learnt = tok.decode([i for i, a in zip(chat.ids, chat.assistant) if a], skip_special_tokens=False)
    assert learnt == "the quick fox<|im_end|><think></think>héllo<|im_end|>"
    with pytest.raises(DataError, match="rejected the conversation: system must come first"):
        tok.encode_chat([CHAT[1], CHAT[0], CHAT[2]])


def test_hf_without_chat_template_uses_the_prompt_format(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "tok", None, add_bos_token=True)))
    example = tokenize_row(InstructionRow(instruction="hello", output="fox"), tok, max_length=64)
    assert example.input_ids[0] == tok.bos_id and example.input_ids[-1] == tok.eos_id
    assert learnt_text(tok, example) == "fox<|im_end|>"
    with pytest.raises(DataError, match="has no chat_template"):
        tokenize_row(ChatRow(messages=CHAT), tok, max_length=64)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"tokenizer folder not found: {tmp_path / 'nope'}"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no tokenizer.json in {tmp_path / 'empty'}"):
        load_tokenizer(str(tmp_path / "empty"))
    folder = make_hf_tokenizer(tmp_path / "tok", eos_token="<eot>")
    with pytest.raises(DataError, match="eos_token '<eot>' is not in the vocabulary"):
        load_tokenizer(str(folder))
    folder = make_hf_tokenizer(tmp_path / "tok2", chat_template="{% for m in messages %}")
    with pytest.raises(DataError, match="chat_template is not valid Jinja"):
        load_tokenizer(str(folder))


# ---- JSONL shapes and errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, kind",
    [
        ({"instruction": "a", "input": "b", "output": "c", "id": 7}, InstructionRow),
        ({"instruction": "a", "output": "c"}, InstructionRow),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, ChatRow),
        ({"text": "plain"}, TextRow),
    ],
)
def test_detect_each_shape(tmp_path: Path, row: dict, kind: type) -> None:
    loaded = load_rows(write_jsonl(tmp_path / "d.jsonl", [row, "", row]))
    assert len(loaded.rows) == 2 and all(isinstance(r, kind) for r in loaded.rows)
    assert [r.line for r in loaded.rows] == [1, 3]


GOOD = {"instruction": "say hi", "output": "hi"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ({"instruction": "x"}, "line 2: missing field 'output' (instruction rows need instruction, output)"),
        ({"instruction": "x", "output": 3}, "line 2: field 'output' must be a string, got 3"),
        ({"instruction": "x", "output": "y", "input": ["z"]}, "line 2: field 'input' must be a string"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "line 2: missing field 'instruction'"),
    ],
)
def test_bad_instruction_rows(tmp_path: Path, bad, message: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value).startswith(f"{path} line 2: ") and message in str(info.value)
    loaded = load_rows(path, skip_bad_rows=True)
    assert (len(loaded.rows), loaded.skipped) == (2, 1) and message in loaded.first_error


@pytest.mark.parametrize(
    "messages, message",
    [
        ("hi", "field 'messages' must be a non-empty list"),
        ([], "field 'messages' must be a non-empty list"),
        ([{"role": "user"}], "messages[0].content is missing"),
        ([{"role": "robot", "content": "x"}], "messages[0].role is 'robot'; expected one of system, user, assistant"),
        ([{"role": "user", "content": "x"}], "no assistant message"),
    ],
)
def test_bad_chat_rows(tmp_path: Path, messages, message: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, good, {"messages": messages}])
    with pytest.raises(DataError, match="line 3: ") as info:
        load_rows(path, "chat")
    assert message in str(info.value)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no usable rows \\(the file is empty\\)"):
        load_rows(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="line 1: cannot tell the row format.*found foo"):
        load_rows(write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}]))
    with pytest.raises(DataError, match="no usable rows \\(2 bad rows skipped"):
        load_rows(write_jsonl(tmp_path / "bad.jsonl", ["{", "}"]), skip_bad_rows=True)
    with pytest.raises(DataError, match="line 1: missing field 'text'"):
        load_rows(write_jsonl(tmp_path / "given.jsonl", [GOOD]), "text")


def test_skip_bad_rows_counts(tmp_path: Path) -> None:
    rows = [GOOD, "{", {"instruction": 1, "output": "x"}, GOOD, {"output": "x"}, GOOD]
    section = DataSection(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), skip_bad_rows=True)
    splits = build_datasets(section, ByteTokenizer())
    assert splits.report.skipped_rows == 3 and len(splits.train) == 3


# ---- loss masks -------------------------------------------------------------------------------


def test_instruction_mask_learns_only_the_response() -> None:
    tok = ByteTokenizer()
    example = tokenize_row(InstructionRow(instruction="add", input="1 2", output="3"), tok, max_length=64)
    assert (
        example.input_ids
        == tok.encode_chat([{"role": "user", "content": "add\n\n1 2"}, {"role": "assistant", "content": "3"}]).ids
    )
    assert example.labels[-2:] == [ord("3"), tok.eos_id]
    assert all(label == IGNORE for label in example.labels[:-2])
    full = tokenize_row(InstructionRow(instruction="add", output="3"), tok, max_length=64, train_on_prompt=True)
    assert full.labels[0] == IGNORE and full.labels[1:] == full.input_ids[1:]


def test_chat_and_text_masks() -> None:
    tok = ByteTokenizer()
    example = tokenize_row(ChatRow(messages=CHAT), tok, max_length=256)
    assert learnt_text(tok, example) == "the quick fox<eos>héllo<eos>"
    text = tokenize_row(TextRow(text="abc"), tok, max_length=64)
    assert text.input_ids == [tok.bos_id, *b"abc", tok.eos_id]
    assert text.labels == [IGNORE, *b"abc", tok.eos_id]


def test_truncation_and_dropping(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    long = tokenize_row(TextRow(text="x" * 100), tok, max_length=16)
    assert len(long) == 16 and long.truncated and long.labels[1:] == long.input_ids[1:]
    rows = [{"instruction": "p" * 40, "output": "r"}, GOOD, GOOD]
    section = DataSection(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), max_length=24)
    splits = build_datasets(section, tok)
    assert len(splits.train) == 2 and splits.report.dropped == 1 and splits.report.truncated == 1


def _records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("moetune")]


def test_rows_that_lose_their_ending_warn_once_with_counts(tmp_path: Path, caplog) -> None:
    tok = ByteTokenizer()
    long = {"instruction": "p", "output": "r" * 40}  # its eos (end of turn) falls past max_length
    path = write_jsonl(tmp_path / "t.jsonl", [long, GOOD, long, GOOD, long])
    example = tokenize_row(load_rows(path).rows[0], tok, max_length=24)
    assert example.truncated and example.lost_ending and example.labels[-1] != tok.eos_id
    with caplog.at_level(logging.INFO, logger="moetune"):
        splits = build_datasets(DataSection(train=str(path), max_length=24, val_fraction=0.4), tok)
    report = splits.report
    assert (report.truncated, report.lost_endings) == (3, 3)  # train and held-out rows together
    warned = _records(caplog, logging.WARNING)
    assert len(warned) == 1 and str(path) in warned[0]
    assert "3 of 5 rows" in warned[0] and "max_length=24" in warned[0] and "stop" in warned[0]
    assert "longest row: 46 tokens" in warned[0]
    assert "3 truncated (3 lose the end of their last response)" in report.summary()


def test_truncation_that_keeps_every_response_whole_is_info(tmp_path: Path, caplog) -> None:
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "tok")))
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the fox"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [row, row])
    full = tokenize_row(load_rows(path).rows[0], tok, max_length=4096)
    assert tok.decode(full.input_ids[-2:], skip_special_tokens=False) == "<|im_end|>\n"
    with caplog.at_level(logging.INFO, logger="moetune"):  # cut only the "\n" after <|im_end|>
        splits = build_datasets(DataSection(train=str(path), max_length=len(full) - 1), tok)
    assert (splits.report.truncated, splits.report.lost_endings) == (2, 0)
    assert not _records(caplog, logging.WARNING)
    info = _records(caplog, logging.INFO)
    assert any(str(path) in line and "2 of 2 rows" in line and f"max_length={len(full) - 1}" in line for line in info)


# ---- collation and packing --------------------------------------------------------------------


def ex(n: int, start: int = 1) -> Example:
    ids = list(range(start, start + n))
    return Example(input_ids=ids, labels=[IGNORE] + ids[1:])


def test_plain_collation_pads_right() -> None:
    batch = Collator(pad_id=0)([[ex(3)], [ex(5, 10)]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, IGNORE], [IGNORE, 11, 12, 13, 14]]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4]
    assert all(t.dtype == torch.long for t in batch.values())
    assert Collator(pad_id=0, pad_to_multiple_of=8)([[ex(3)]])["input_ids"].shape == (1, 8)


def test_packing_rows_and_ids() -> None:
    examples = [ex(n, 100 * i) for i, n in enumerate([5, 3, 7, 2, 6, 4, 1])]
    rows = pack_examples(examples, max_length=10)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)  # each once, unsplit
    assert all(sum(len(e) for e in row) <= 10 for row in rows) and len(rows) == 3  # 28 tokens
    assert pack_examples(examples, 10) == rows  # deterministic
    batch = Collator(pad_id=0, packing=True)(rows)
    for b, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            span = slice(start, start + len(example))
            assert batch["segment_ids"][b, span].tolist() == [segment] * len(example)
            assert batch["position_ids"][b, span].tolist() == list(range(len(example)))
            assert batch["input_ids"][b, span].tolist() == example.input_ids
            assert batch["labels"][b, start].item() == IGNORE  # never predicted across the boundary
            start += len(example)
        assert batch["segment_ids"][b, start:].eq(0).all() and batch["labels"][b, start:].eq(IGNORE).all()
        assert batch["attention_mask"][b].sum().item() == start


def test_packing_truncates_long_examples(tmp_path: Path) -> None:
    rows = [{"text": "a" * 50}, {"text": "b"}, {"text": "c" * 5}]
    section = DataSection(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), max_length=12, packing=True)
    splits = build_datasets(section, ByteTokenizer())
    assert [len(e) for e in splits.train] == [12, 3, 7]
    loader = make_train_loader(splits.train, batch_size=2, max_length=12, packing=True, pad_id=256, seed=0)
    assert [[len(e) for e in row] for row in loader.rows] == [[12], [7, 3]]
    with pytest.raises(ValueError, match="more than max_length"):
        pack_examples([ex(13)], 12)


# ---- datasets, sampler, resume, shards --------------------------------------------------------


def test_validation_split_and_eval_file(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    splits = build_datasets(DataSection(train=str(path), val_fraction=0.25, seed=3), ByteTokenizer())
    again = build_datasets(DataSection(train=str(path), val_fraction=0.25, seed=3), ByteTokenizer())
    other = build_datasets(DataSection(train=str(path), val_fraction=0.25, seed=4), ByteTokenizer())
    assert (len(splits.train), len(splits.eval)) == (15, 5)
    assert splits.eval == again.eval and splits.eval != other.eval
    texts = {tuple(e.input_ids) for e in splits.train} | {tuple(e.input_ids) for e in splits.eval}
    assert len(texts) == 20
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"text": "held"}])
    splits = build_datasets(DataSection(train=str(path), eval=str(eval_path)), ByteTokenizer())
    assert (len(splits.train), len(splits.eval)) == (20, 1)


def test_sampler_resumes_exactly() -> None:
    sampler = ResumableSampler(num_items=10, batch_size=3, seed=5)
    stream = sampler.iter_from()
    first = [next(stream) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    assert [state.to_dict() for _, state in first[:4]] == [
        {"epoch": 0, "index": 3},
        {"epoch": 0, "index": 6},
        {"epoch": 0, "index": 9},
        {"epoch": 1, "index": 3},
    ]
    assert len({i for batch, _ in first[:3] for i in batch}) == 9  # an epoch never repeats an item
    assert first[0][0] != first[3][0]  # epochs are shuffled differently
    for k in range(7):
        restored = SamplerState.from_dict(first[k][1].to_dict())
        resumed = ResumableSampler(num_items=10, batch_size=3, seed=5).iter_from(restored)
        assert [next(resumed) for _ in range(7 - k - 1)] == first[k + 1 :]


def test_rank_shards_partition_the_global_batch() -> None:
    single = ResumableSampler(num_items=23, batch_size=6, seed=1).iter_from()
    ranks = [ResumableSampler(num_items=23, batch_size=2, seed=1, rank=r, world_size=3).iter_from() for r in range(3)]
    for _ in range(8):
        whole, state = next(single)
        parts = [next(stream) for stream in ranks]
        assert [i for part, _ in parts for i in part] == whole
        assert all(s == state for _, s in parts)


def test_batch_loader_resume_is_bit_identical(tmp_path: Path) -> None:
    rows = [{"text": "x" * (i % 7 + 1)} for i in range(30)]
    section = DataSection(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), max_length=16, packing=True)
    examples = build_datasets(section, ByteTokenizer()).train
    loader = make_train_loader(examples, batch_size=2, max_length=16, packing=True, pad_id=256, seed=9)
    stream = loader.iter_from()
    batches = [next(stream) for _ in range(6)]
    again = make_train_loader(examples, batch_size=2, max_length=16, packing=True, pad_id=256, seed=9)
    resumed = again.iter_from(SamplerState.from_dict(batches[2][1].to_dict()))
    for expected, _ in batches[3:]:
        got, _ = next(resumed)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_sampler_errors() -> None:
    with pytest.raises(DataError, match="has 3 items but one batch needs 4"):
        ResumableSampler(num_items=3, batch_size=2, seed=0, world_size=2)
    with pytest.raises(CheckpointError, match="bad data sampler state"):
        SamplerState.from_dict({"epoch": 0})
    with pytest.raises(CheckpointError):
        SamplerState.from_dict({"epoch": -1, "index": 0})
    with pytest.raises(ValueError, match="rows but the sampler expects"):
        BatchLoader(
            rows=[[ex(2)]], sampler=ResumableSampler(num_items=2, batch_size=1, seed=0), collator=Collator(pad_id=0)
        )


def test_eval_batches_cover_every_example_once() -> None:
    examples = [ex(n + 1, 10 * n) for n in range(7)]
    seen = []
    for rank in range(2):
        for batch in eval_batches(examples, batch_size=2, pad_id=0, rank=rank, world_size=2):
            seen += [row[0].item() for row in batch["input_ids"]]
    assert sorted(seen) == [10 * n for n in range(7)]
