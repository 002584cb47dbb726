"""Tokenizers: a small protocol, a built-in byte tokenizer, and :func:`load_tokenizer`.

The byte tokenizer needs no files: ids 0-255 are the UTF-8 bytes, then six specials. Its chat
format is ``<bos> (<role> content <eos>)*``, so an assistant turn ends with ``<eos>`` and
generation stops there. Hugging Face tokenizer folders are handled by
:class:`moetune.data.hf_tokenizer.HFTokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from moetune.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatEncoding:
    """A tokenised conversation.

    Attributes:
        ids: token ids of the whole rendered conversation.
        assistant: per token, True where it belongs to an assistant turn (its content and its
            end-of-turn marker, not the role header); the tokens that carry loss by default.
    """

    ids: list[int]
    assistant: list[bool]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.assistant):
            raise ValueError(f"ids ({len(self.ids)}) and assistant ({len(self.assistant)}) differ in length")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    ``encode`` never adds special tokens; callers add ``bos_id`` (when ``add_bos``) and ``eos_id``.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool
    has_chat_template: bool

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens added."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation rendered as text (for display and for HF parity)."""
        ...

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> ChatEncoding:
        """Token ids of the conversation and which of them are assistant tokens."""
        ...


class ByteTokenizer:
    """UTF-8 bytes plus pad, bos, eos and three role markers; deterministic and file-free.

    ``decode`` drops special ids and replaces invalid UTF-8 (from a cut multi-byte character).
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    role_ids = {"system": 259, "user": 260, "assistant": 261}
    vocab_size = 262
    add_bos = True
    has_chat_template = True
    special_names = {256: "<pad>", 257: "<bos>", 258: "<eos>", 259: "<|system|>", 260: "<|user|>", 261: "<|assistant|>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(self.special_names.get(i, f"<{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        encoding = self.encode_chat(messages, add_generation_prompt)
        return self.decode(encoding.ids, skip_special_tokens=False)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> ChatEncoding:
        ids, assistant = [self.bos_id], [False]
        for message in messages:
            role = message["role"]
            if role not in self.role_ids:
                raise DataError(f"unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
            if message.get("reasoning_content"):
                raise DataError(
                    "the byte tokenizer has no format for reasoning_content; put the reasoning "
                    "in content, or use a tokenizer whose chat template renders it"
                )
            body = [*self.encode(message["content"]), self.eos_id]
            ids += [self.role_ids[role], *body]
            assistant += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            assistant.append(False)
        return ChatEncoding(ids=ids, assistant=assistant)
