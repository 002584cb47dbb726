"""Preference and KTO rows: parsing, completion-only labels, KTO's mismatched rows, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune.config import DataSection
from moetune.data import ByteTokenizer, build_datasets
from moetune.data.examples import IGNORE
from moetune.data.preference import PreferenceCollator, build_preference_datasets
from moetune.errors import DataError

TOK = ByteTokenizer()


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _build(path: str, kind: str = "pairs", **section):
    return build_preference_datasets(DataSection(train=path, **section), TOK, kind=kind, seed=0)


def _learnt(example) -> str:
    return TOK.decode([t for t in example.labels if t != IGNORE], skip_special_tokens=False)


def test_string_and_chat_pairs_learn_only_the_completion(tmp_path):
    chat_prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "earlier turn"},
        {"role": "user", "content": "again"},
    ]
    rows = [
        {"prompt": "upper: abc", "chosen": "ABC", "rejected": "abc", "id": 7},
        {
            "prompt": chat_prompt,
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    ]
    data = _build(_write(tmp_path / "p.jsonl", rows))
    first, second = data.train
    assert (_learnt(first.first), _learnt(first.second)) == ("ABC<eos>", "abc<eos>")
    assert (_learnt(second.first), _learnt(second.second)) == ("yes<eos>", "no<eos>")  # not the earlier turn
    whole = TOK.decode(second.first.input_ids, skip_special_tokens=False)
    assert whole == "<bos><|user|>hi<eos><|assistant|>earlier turn<eos><|user|>again<eos><|assistant|>yes<eos>"
    batch = PreferenceCollator(pad_id=TOK.pad_id)([[e] for e in data.train])
    assert batch["input_ids"].shape[0] == 4 and batch["example_index"].tolist() == [0, 1]
    assert data.report.format == "preference" and data.report.train_examples == 2


def test_kto_rows_pair_each_prompt_with_the_previous_completion(tmp_path):
    rows = [
        {"prompt": "a", "completion": "xx", "label": True},
        {"prompt": "bb", "completion": "y", "label": False},
        {"prompt": "c", "completion": "zzz", "label": True},
    ]
    data = _build(_write(tmp_path / "k.jsonl", rows), kind="kto")
    texts = [TOK.decode(e.second.input_ids, skip_special_tokens=False) for e in data.train]
    assert texts[0] == "<bos><|user|>a<eos><|assistant|>zzz<eos>"  # the last row's completion
    assert texts[1] == "<bos><|user|>bb<eos><|assistant|>xx<eos>"
    assert [e.label for e in data.train] == [True, False, True]
    assert _learnt(data.train[1].second) == "xx<eos>"
    batch = PreferenceCollator(pad_id=TOK.pad_id)([[e] for e in data.train])
    assert batch["kto_label"].tolist() == [True, False, True]


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "p", "chosen": "c"},
            "line 2: missing field 'rejected' (preference rows need prompt, chosen, rejected)",
        ),
        (
            {"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"},
            "must both be strings or both lists of messages",
        ),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "line 2: field 'chosen' must be a non-empty string or list"),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "chosen": [{"role": "user", "content": "c"}],
                "rejected": [],
            },
            "line 2: field 'chosen': a completion's messages must all be assistant turns",
        ),
        ({"prompt": [{"role": "robot", "content": "p"}], "chosen": [], "rejected": []}, "messages[0].role is 'robot'"),
        ("{not json", "line 2: not valid JSON"),
    ],
)
def test_bad_preference_rows_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "A", "rejected": "a"}, row])
    with pytest.raises(DataError) as err:
        _build(path)
    assert message in str(err.value) and str(err.value).startswith(path) and "\n" not in str(err.value)


def test_bad_kto_label_and_skipped_rows(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": "yes"}]
    path = _write(tmp_path / "k.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2: field 'label' is \"yes\", not true or false"):
        _build(path, kind="kto")
    assert _build(path, kind="kto", skip_bad_rows=True).report.skipped_rows == 1


def test_rows_of_the_wrong_objective_are_refused_in_one_line(tmp_path):
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "A", "rejected": "a"}])
    sft = _write(tmp_path / "s.jsonl", [{"instruction": "p", "output": "A"}])
    with pytest.raises(DataError, match="preference rows are trained with optim.objective: dpo, ipo, simpo or orpo"):
        build_datasets(DataSection(train=pairs), TOK)
    with pytest.raises(DataError, match="instruction rows, but this objective trains on rows of prompt, chosen"):
        _build(sft)
    with pytest.raises(DataError, match="preference rows, but this objective trains on rows of prompt, completion"):
        _build(pairs, kind="kto")


def test_completions_cut_away_by_max_length_are_dropped(tmp_path):
    rows = [{"prompt": "p" * 40, "chosen": "A", "rejected": "a"}, {"prompt": "p", "chosen": "AB", "rejected": "ab"}]
    data = _build(_write(tmp_path / "p.jsonl", rows), max_length=20)
    assert data.report.dropped == 1 and len(data.train) == 1 and data.train[0].index == 0
