"""Hugging Face tokenizer folders: ``tokenizer.json`` plus ``tokenizer_config.json``.

The chat template is Jinja, rendered in a sandbox with the globals Hugging Face provides
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text).

Finding the assistant tokens of a rendered conversation (what carries loss): the full
conversation is rendered once and tokenised with character offsets. An assistant turn's span
starts after its role header: where the text stops agreeing with ``messages[:i]`` rendered with the
generation prompt (checked to agree with the text up to the turn). It ends after the template's
end-of-turn marker (e.g. ``<|im_end|>``, learnt once by rendering a probe conversation), so on
every turn, the last one included, the marker is learnt and what the template writes after it
(ChatML's newline) is not: the model learns to stop, never to write the next turn's formatting.
Whatever the template renders in between is learnt as rendered: Qwen3 renders the last turns'
reasoning (``reasoning_content``, or a ``<think>`` block in ``content``) as ``<think>...</think>``
and drops it from earlier turns, exactly as transformers' ``apply_chat_template``. Tokens whose
first character falls in a span are assistant tokens. A template whose prefix renders do not
agree with the full text falls back to finding the message content after the previous span.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moetune.data.tokenizer import ChatEncoding
from moetune.errors import DataError

log = logging.getLogger(__name__)
_PROBE = "MOETUNE-PROBE-7f3a"


class _TemplateRejected(DataError):
    """The chat template called raise_exception(); the conversation does not suit it."""


def _raise_exception(message: str) -> None:
    raise _TemplateRejected(f"the chat template rejected the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialised AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def _find_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The chat template: ``chat_template.jinja`` if present, else the config's (named 'default')."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    return template


def message_text(message: dict[str, str]) -> str:
    """The part of a message's content every template writes (a leading ``<think>`` block cut off)."""
    content = message["content"]
    return content.split("</think>")[-1].lstrip("\n") if "</think>" in content else content


class HFTokenizer:
    """A fast tokenizer read with the ``tokenizers`` library; see the module docstring for chats."""

    def __init__(
        self, *, tokenizer: tokenizers.Tokenizer, config: dict[str, Any], source: str, chat_template: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        if self.eos_token is None:
            raise DataError(
                f"{source}: tokenizer_config.json names no eos_token; moetune needs one to end each response"
            )
        self.bos_id = self._id(self.bos_token, "bos_token") if self.bos_token else None
        self.eos_id = self._id(self.eos_token, "eos_token")
        # Many causal LMs have no pad token; padded positions are masked, so eos is a safe stand-in.
        self.pad_id = self._id(self.pad_token, "pad_token") if self.pad_token else self.eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.add_bos = self._wants_bos(config)
        self.chat_template = chat_template
        self.has_chat_template = chat_template is not None
        self.template = None
        if chat_template is not None:
            try:
                self.template = _template_env().from_string(chat_template)
            except jinja2.TemplateError as err:
                raise DataError(f"{source}: chat_template is not valid Jinja: {err}") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        """Read ``tokenizer.json`` and, when present, ``tokenizer_config.json`` from ``folder``.

        Raises:
            DataError: a file is missing or unreadable, or a named special token is unknown.
        """
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise DataError(f"no tokenizer.json in {folder}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise DataError(f"cannot read {folder / 'tokenizer.json'}: {err}") from None
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        return cls(tokenizer=tokenizer, config=config, source=str(folder), chat_template=_find_template(folder, config))

    def _id(self, token: str, name: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"{self.source}: {name} {token!r} is not in the vocabulary")
        return token_id

    def _wants_bos(self, config: dict[str, Any]) -> bool:
        if self.bos_id is None:
            return False
        if "add_bos_token" in config:
            return bool(config["add_bos_token"])
        # No flag: do what tokenizer.json's post-processor does.
        return self.tokenizer.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render ``messages`` with the folder's Jinja chat template.

        Raises:
            DataError: there is no template, or it fails or rejects the conversation.
        """
        if self.template is None:
            raise DataError(
                f"{self.source} has no chat_template; use instruction or text rows, or a "
                f"tokenizer folder whose tokenizer_config.json has one"
            )
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token,
                pad_token=self.pad_token or "",
            )
        except jinja2.TemplateError as err:
            raise DataError(f"{self.source}: the chat template failed: {err}") from None

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> ChatEncoding:
        if any(m.get("reasoning_content") for m in messages) and not self.renders_reasoning:
            raise DataError(
                f"the chat template of {self.source} ignores reasoning_content; put the reasoning "
                f"in content, or use a tokenizer whose template renders it"
            )
        text = self.apply_chat_template(messages, add_generation_prompt)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        spans = self._assistant_spans(messages, text)
        assistant = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding.offsets]
        return ChatEncoding(ids=list(encoding.ids), assistant=assistant)

    def _assistant_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in ``text`` (see the module docstring)."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._turn_start(messages, i, text, cursor)
            end = self._turn_stop(messages, i, text, start)
            spans.append((start, end))
            cursor = end
        return spans

    def _turn_start(self, messages: list[dict[str, str]], i: int, text: str, cursor: int) -> int:
        """Where assistant message ``i``'s tokens start: after its role header."""
        history = self._render_or_none(messages[:i], add_generation_prompt=False)
        prompt = self._render_or_none(messages[:i], add_generation_prompt=True)
        if (
            history is not None
            and prompt is not None
            and prompt.startswith(history)
            and text.startswith(history)
            and len(history) >= cursor
        ):
            header, rest = prompt[len(history) :], text[len(history) :]
            agree = next((n for n, (a, b) in enumerate(zip(header, rest)) if a != b), min(len(header), len(rest)))
            return len(history) + agree
        return self._find(text, message_text(messages[i]), cursor)

    def _turn_stop(self, messages: list[dict[str, str]], i: int, text: str, start: int) -> int:
        """Where assistant message ``i``'s tokens stop: after the end-of-turn marker."""
        if self.turn_end:
            at = text.find(self.turn_end, start)
            if at >= 0:
                return at + len(self.turn_end)
        upto = self._render_or_none(messages[: i + 1], add_generation_prompt=False)
        if upto is not None and text.startswith(upto) and len(upto.rstrip()) > start:
            return len(upto.rstrip())  # no marker known: the turn's text, not the whitespace after it
        content = message_text(messages[i])
        return self._find(text, content, start) + len(content)

    def _render_or_none(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
        # A template may refuse a prefix (e.g. one that must start with a user turn).
        try:
            return self.apply_chat_template(messages, add_generation_prompt)
        except DataError:
            return None

    def _find(self, text: str, content: str, start: int) -> int:
        at = text.find(content, start)
        if at < 0:
            raise DataError(
                f"{self.source}: cannot locate an assistant message in the rendered chat "
                f"(the chat template changes its content); cannot mask the prompt"
            )
        return at

    @cached_property
    def renders_reasoning(self) -> bool:
        """Whether the template writes an assistant message's ``reasoning_content`` at all."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": _PROBE}]
        return _PROBE in (self._render_or_none(probe, add_generation_prompt=False) or "")

    @cached_property
    def turn_end(self) -> str:
        """What the template writes after an assistant message's content (e.g. ``<|im_end|>``)."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self.apply_chat_template(probe)
        except DataError as err:
            log.info("could not learn the end-of-turn marker of %s (%s)", self.source, err)
            return ""
        at = text.rfind(_PROBE)
        return text[at + len(_PROBE) :].rstrip() if at >= 0 else ""
