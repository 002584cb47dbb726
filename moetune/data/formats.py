"""JSONL dataset files: read rows with their line numbers, detect and check their shape.

Row shapes (extra fields, such as an ``id``, are allowed and unused)::

    {"instruction": "...", "input": "...", "output": "..."}        # instruction; input optional
    {"messages": [{"role": "user", "content": "..."}, ...]}        # chat; roles system/user/assistant
                                                                  # (assistant: reasoning_content optional)
    {"text": "..."}                                               # plain text
    {"prompt": P, "chosen": C, "rejected": C}                     # preference pair (dpo, ipo, simpo, orpo)
    {"prompt": P, "completion": C, "label": true}                 # unpaired, desirable or not (kto)

In the last two, P and C are both strings, or both lists of chat messages (the completion's
messages are assistant turns).

With ``format: auto`` the shape of a file is that of its first well-formed row (``messages``,
then ``instruction``, ``text``, ``chosen``, ``completion`` decides); every row must then have that shape. Blank lines
are skipped. A bad row is an error naming the file and line, unless ``skip_bad_rows`` is set:
then it is skipped, counted and reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

from moetune.data.tokenizer import ROLES
from moetune.errors import DataError

log = logging.getLogger(__name__)
RowFormat = Literal["instruction", "chat", "text", "preference", "kto"]
FORMATS: tuple[RowFormat, ...] = ("instruction", "chat", "text", "preference", "kto")
Turns = Union[str, list[dict[str, str]]]  # a prompt or completion: text, or chat messages


class RowError(DataError):
    """What is wrong with one row; the caller adds the file and line."""


@dataclass(frozen=True)
class InstructionRow:
    """An instruction, an optional input, and the response to learn."""

    instruction: str
    output: str
    input: str = ""
    line: int = 0


@dataclass(frozen=True)
class ChatRow:
    """A conversation; the assistant turns are learnt."""

    messages: list[dict[str, str]]
    line: int = 0


@dataclass(frozen=True)
class TextRow:
    """Plain text; every token is learnt."""

    text: str
    line: int = 0


@dataclass(frozen=True)
class PromptedRow:
    """A prompt whose completions (the subclass's fields) are learnt, the prompt never."""

    prompt: Turns
    line: int = field(default=0, kw_only=True)


@dataclass(frozen=True)
class PreferenceRow(PromptedRow):
    """A prompt with a chosen and a rejected completion."""

    chosen: Turns
    rejected: Turns


@dataclass(frozen=True)
class KTORow(PromptedRow):
    """A prompt with one completion, desirable (``label`` true) or not."""

    completion: Turns
    label: bool


Row = Union[InstructionRow, ChatRow, TextRow, PreferenceRow, KTORow]


@dataclass(frozen=True)
class LoadedRows:
    """The rows of one file and what was skipped.

    Attributes:
        path: the file read.
        format: its row shape, detected or given.
        rows: the well-formed rows, in file order.
        skipped: how many bad rows were skipped (only with ``skip_bad_rows``).
        first_error: the message of the first skipped row, for the report.
    """

    path: str
    format: RowFormat
    rows: list[Row]
    skipped: int = 0
    first_error: str | None = None


def _string(obj: dict[str, Any], name: str, shape: str, optional: bool = False) -> str:
    value = obj.get(name)
    if value is None and optional:
        return ""
    if name not in obj:
        raise RowError(f"missing field '{name}' ({shape})")
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {json.dumps(value)[:40]}")
    return value


def _parse_instruction(obj: dict[str, Any], line: int) -> InstructionRow:
    shape = "instruction rows need instruction, output"
    return InstructionRow(
        instruction=_string(obj, "instruction", shape),
        output=_string(obj, "output", shape),
        input=_string(obj, "input", shape, optional=True),
        line=line,
    )


def _parse_message(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RowError(f"{where} must be an object with role and content")
    for name in ("role", "content"):
        if not isinstance(message.get(name), str):
            problem = "missing" if name not in message else "not a string"
            raise RowError(f"{where}.{name} is {problem} (chat messages need role, content)")
    if message["role"] not in ROLES:
        raise RowError(f"{where}.role is {message['role']!r}; expected one of {', '.join(ROLES)}")
    parsed = {"role": message["role"], "content": message["content"]}
    reasoning = message.get("reasoning_content")
    if reasoning is not None:  # rendered by the chat template, as transformers does (Qwen3: <think>)
        if not isinstance(reasoning, str):
            raise RowError(f"{where}.reasoning_content is not a string")
        if message["role"] != "assistant":
            raise RowError(f"{where}.reasoning_content: only assistant messages have reasoning")
        parsed["reasoning_content"] = reasoning
    return parsed


def _parse_chat(obj: dict[str, Any], line: int) -> ChatRow:
    messages = obj.get("messages")
    if "messages" not in obj:
        raise RowError("missing field 'messages' (chat rows need messages)")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    parsed = [_parse_message(i, m) for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in parsed):
        raise RowError("the conversation has no assistant message (nothing to learn)")
    return ChatRow(messages=parsed, line=line)


def _parse_text(obj: dict[str, Any], line: int) -> TextRow:
    text = _string(obj, "text", "text rows need text")
    if not text:
        raise RowError("field 'text' is empty")
    return TextRow(text=text, line=line)


def _turns(obj: dict[str, Any], name: str, shape: str, prompt: Turns | None = None) -> Turns:
    """A prompt (``prompt`` None) or a completion of that prompt: both strings, or both lists of
    chat messages (a completion's all assistant turns)."""
    value = obj.get(name)
    if name not in obj:
        raise RowError(f"missing field '{name}' ({shape})")
    if not isinstance(value, (str, list)) or not value:
        raise RowError(f"field '{name}' must be a non-empty string or list of {{role, content}} messages")
    if prompt is not None and isinstance(value, str) != isinstance(prompt, str):
        raise RowError(f"'prompt' and '{name}' must both be strings or both lists of messages")
    if isinstance(value, str):
        return value
    messages = [_parse_message(i, m) for i, m in enumerate(value)]
    if prompt is not None and any(m["role"] != "assistant" for m in messages):
        raise RowError(f"field '{name}': a completion's messages must all be assistant turns")
    return messages


def _parse_preference(obj: dict[str, Any], line: int) -> PreferenceRow:
    shape = "preference rows need prompt, chosen, rejected"
    prompt = _turns(obj, "prompt", shape)
    chosen, rejected = (_turns(obj, name, shape, prompt) for name in ("chosen", "rejected"))
    return PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected, line=line)


def _parse_kto(obj: dict[str, Any], line: int) -> KTORow:
    shape = "kto rows need prompt, completion, label"
    prompt = _turns(obj, "prompt", shape)
    completion = _turns(obj, "completion", shape, prompt)
    if not isinstance(obj.get("label"), bool):
        problem = "missing" if "label" not in obj else f"{json.dumps(obj['label'])[:40]}, not true or false"
        raise RowError(f"field 'label' is {problem} ({shape})")
    return KTORow(prompt=prompt, completion=completion, label=obj["label"], line=line)


# Each format's parser, and the field that tells a row is of that format (tried in this order).
PARSERS: dict[RowFormat, tuple[Callable[[dict[str, Any], int], Row], str]] = {
    "chat": (_parse_chat, "messages"),
    "instruction": (_parse_instruction, "instruction"),
    "text": (_parse_text, "text"),
    "preference": (_parse_preference, "chosen"),
    "kto": (_parse_kto, "completion"),
}


def detect_format(obj: dict[str, Any]) -> RowFormat:
    """The shape of one row, from its fields.

    Raises:
        RowError: none of ``messages``, ``instruction``, ``text``, ``chosen``, ``completion`` is present.
    """
    for shape, (_, key) in PARSERS.items():
        if key in obj:
            return shape
    found = ", ".join(sorted(obj)) or "none"
    raise RowError(
        "cannot tell the row format: expected a 'messages' (chat), 'instruction', 'text', 'chosen' (preference) "
        f"or 'completion' (kto) field; found {found}"
    )


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield ``(line number, object)`` per non-blank line, or ``(line, RowError)`` for a bad line."""
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").lstrip("\ufeff") if line_no == 1 else raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, RowError("not valid UTF-8")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield line_no, RowError(f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(obj, dict):
                yield line_no, RowError(f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield line_no, obj


def load_rows(path: str | Path, format: str = "auto", skip_bad_rows: bool = False) -> LoadedRows:
    """Read and check every row of a JSONL file.

    Args:
        path: the ``.jsonl`` file.
        format: ``auto`` or one of :data:`FORMATS`.
        skip_bad_rows: skip and count malformed rows instead of raising.

    Raises:
        DataError: the file is missing or has no rows, or a row is bad (without
            ``skip_bad_rows``): ``"train.jsonl line 7: missing field 'output' (...)"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if format != "auto" and format not in PARSERS:
        raise DataError(f"unknown data format {format!r}; expected auto, {', '.join(FORMATS)}")
    shape: RowFormat | None = None if format == "auto" else format  # type: ignore[assignment]
    rows: list[Row] = []
    skipped, first_error = 0, None
    for line_no, obj in read_jsonl(path):
        try:
            if isinstance(obj, RowError):
                raise obj
            row_shape = shape or detect_format(obj)
            rows.append(PARSERS[row_shape][0](obj, line_no))
            shape = row_shape
        except RowError as err:
            message = f"{path} line {line_no}: {err}"
            if not skip_bad_rows:
                raise DataError(message) from None
            skipped, first_error = skipped + 1, first_error or message
    if not rows:
        detail = f"{skipped} bad rows skipped, the first: {first_error}" if skipped else "the file is empty"
        raise DataError(f"{path}: no usable rows ({detail})")
    if skipped:
        log.warning("%s: skipped %d bad rows (the first: %s)", path, skipped, first_error)
    return LoadedRows(path=str(path), format=shape, rows=rows, skipped=skipped, first_error=first_error)  # type: ignore[arg-type]
