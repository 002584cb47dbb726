"""Chat rows with the real Qwen3 chat template: reasoning, history rewriting, the loss mask.

Token ids must equal transformers' ``apply_chat_template`` on the same tokenizer; the loss mask
covers every assistant turn as the template renders it, from after the role header through the
end-of-turn marker ``<|im_end|>``, and never the newline the template writes after that marker
(the same on every turn, the last one included).

``fixtures/qwen3_chat_template.jinja`` is the ``chat_template`` of the Qwen3 tokenizer_config.json
(Hugging Face ``Qwen/Qwen3-*``), taken verbatim from the tokenizer_config.json dump in
github.com/akougkas/warpio-cli ``warpio-docs/ai-docs/model_cards/qwen3:4b.md`` (a 2507 release,
whose generation prompt is ``<|im_start|>assistant\\n<think>\\n``), with that last block put back
to the original Qwen3 / Qwen3-30B-A3B one (``<|im_start|>assistant\\n``, plus an empty think
block when ``enable_thinking`` is false; as quoted in the Hugging Face blog "The 4 Things
Qwen-3's Chat Template Teaches Us"). The rest, which decides how a training conversation renders,
is byte-for-byte the released text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moetune.config import DataSection
from moetune.data import ByteTokenizer, build_datasets, load_rows, load_tokenizer, tokenize_row
from moetune.errors import DataError
from tokenizer_helpers import CHATML, make_hf_tokenizer, write_jsonl

QWEN3 = (Path(__file__).parent.parent / "fixtures" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
HEADER, END = "<|im_start|>assistant\n", "<|im_end|>"

CONVERSATIONS = {
    "think in an earlier turn": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "<think>\nthe user says hello\n</think>\n\nhello world"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "héllo, the quick fox"},
    ],
    "think in every turn": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nthe quick fox"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "<think>\nfine\n</think>\n\nhéllo"},
    ],
    "reasoning_content": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the quick fox", "reasoning_content": "old thought"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "héllo wörld", "reasoning_content": "brown fox\nthinks"},
    ],
    "two assistant turns after the last user turn": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the quick", "reasoning_content": "first"},
        {"role": "assistant", "content": "<think>x</think>brown fox"},
    ],
}


def qwen3_folder(root: Path) -> Path:
    """A tiny BPE tokenizer with Qwen3's special tokens, <think>/</think> added as in Qwen3."""
    from tokenizers import AddedToken, Tokenizer

    folder = make_hf_tokenizer(root, QWEN3, bos_token=None, eos_token="<|im_end|>", pad_token="<pad>")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens(
        [
            AddedToken("<think>", special=False, normalized=False),
            AddedToken("</think>", special=False, normalized=False),
        ]
    )
    tok.save(str(folder / "tokenizer.json"))
    return folder


def reference(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=QWEN3)


def learnt_runs(tok, ids: list[int], learnt: list[bool]) -> list[str]:
    """The decoded text of each contiguous run of learnt tokens."""
    runs, current = [], []
    for token, keep in zip([*ids, -1], [*learnt, False]):
        if keep:
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    return runs


def assistant_turns(text: str) -> list[str]:
    """Each assistant turn of a rendered ChatML conversation: after its header, through <|im_end|>."""
    turns, at = [], text.find(HEADER)
    while at >= 0:
        start = at + len(HEADER)
        end = text.index(END, start) + len(END)
        turns.append(text[start:end])
        at = text.find(HEADER, end)
    return turns


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen3_chat_ids_and_mask_match_transformers(tmp_path: Path, name: str) -> None:
    folder = qwen3_folder(tmp_path / "tok")
    ref, tok = reference(folder), load_tokenizer(str(folder))
    messages = CONVERSATIONS[name]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    row = load_rows(path).rows[0]  # through the JSONL reader: reasoning_content must survive it
    example = tokenize_row(row, tok, max_length=4096)
    text = ref.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == ref.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert tok.apply_chat_template(row.messages) == text
    learnt = [label != -100 for label in example.labels]
    assert learnt_runs(tok, example.input_ids, learnt) == assistant_turns(text)
    ends = [i for i, token in enumerate(example.input_ids) if token == tok.eos_id and learnt[i]]
    assert len(ends) == len(assistant_turns(text)) == sum(m["role"] == "assistant" for m in messages)
    assert all(tok.decode(example.input_ids[i + 1 : i + 2]) == "\n" and not learnt[i + 1] for i in ends)


def test_qwen3_renders_reasoning_and_strips_old_reasoning(tmp_path: Path) -> None:
    tok = load_tokenizer(str(qwen3_folder(tmp_path / "tok")))
    chat = tok.encode_chat(CONVERSATIONS["reasoning_content"])
    turns = learnt_runs(tok, chat.ids, chat.assistant)
    assert turns == ["the quick fox<|im_end|>", "<think>\nbrown fox\nthinks\n</think>\n\nhéllo wörld<|im_end|>"]
    chat = tok.encode_chat(CONVERSATIONS["think in an earlier turn"])
    assert learnt_runs(tok, chat.ids, chat.assistant) == [
        "hello world<|im_end|>",
        "<think>\n\n</think>\n\nhéllo, the quick fox<|im_end|>",
    ]


def test_newline_after_the_turn_end_is_never_learnt(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "tok", CHATML)))
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the quick fox"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "héllo"},
    ]
    chat = tok.encode_chat(messages)
    assert learnt_runs(tok, chat.ids, chat.assistant) == ["the quick fox<|im_end|>", "héllo<|im_end|>"]


def test_reasoning_content_is_never_dropped_silently(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo", "reasoning_content": "hm"},
            ]
        }
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    chatml = load_tokenizer(str(make_hf_tokenizer(tmp_path / "tok", CHATML)))
    for tok, what in ((chatml, "chat template"), (ByteTokenizer(), "byte tokenizer")):
        with pytest.raises(DataError, match=rf"chat.jsonl line 1: .*{what}.* reasoning_content"):
            build_datasets(DataSection(train=str(path)), tok)


@pytest.mark.parametrize(
    "message, error",
    [
        (
            {"role": "assistant", "content": "yo", "reasoning_content": 3},
            "messages[1].reasoning_content is not a string",
        ),
        ({"role": "user", "content": "yo", "reasoning_content": "hm"}, "messages[1].reasoning_content: only assistant"),
    ],
)
def test_bad_reasoning_content(tmp_path: Path, message: dict, error: str) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, message, {"role": "assistant", "content": "ok"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value).startswith(f"{path} line 1: {error}") and "\n" not in str(err.value)
