"""Hugging Face tokenizer folders: ``tokenizer.json`` plus ``tokenizer_config.json``.

The chat template is Jinja, rendered in a sandbox with the globals Hugging Face provides
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text).

Finding the assistant tokens of a rendered conversation (what carries loss): the full
conversation is rendered once and tokenised with character offsets. For each assistant message
``i`` its span starts where ``messages[:i]`` rendered with the generation prompt ends, and stops
where ``messages[:i+1]`` rendered ends, so the end-of-turn marker is trained and the role header
is not. Tokens whose first character falls in a span are assistant tokens. Some templates render
history differently from the last turn (Qwen3 drops past reasoning blocks), so a prefix render is
not always a prefix of the full text; then the span falls back to the message content found in
the text after the previous span, extended over the template's end-of-turn marker (learnt once by
rendering a probe conversation).
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


class HFTokenizer:
    """A fast tokenizer read with the ``tokenizers`` library; see the module docstring for chats."""

    def __init__(self, *, tokenizer: tokenizers.Tokenizer, config: dict[str, Any], source: str,
                 chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        if self.eos_token is None:
            raise DataError(f"{source}: tokenizer_config.json names no eos_token; moetune needs one "
                            f"to end each response")
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
        return cls(tokenizer=tokenizer, config=config, source=str(folder),
                   chat_template=_find_template(folder, config))

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
            raise DataError(f"{self.source} has no chat_template; use instruction or text rows, or a "
                            f"tokenizer folder whose tokenizer_config.json has one")
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token, pad_token=self.pad_token or "")
        except jinja2.TemplateError as err:
            raise DataError(f"{self.source}: the chat template failed: {err}") from None

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> ChatEncoding:
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
            prompt = self._render_or_none(messages[:i], add_generation_prompt=True)
            upto = self.apply_chat_template(messages[: i + 1])
            if prompt is not None and text.startswith(prompt) and len(prompt) >= cursor:
                start = len(prompt)
            else:
                start = self._find(text, message["content"], cursor)
            if text.startswith(upto) and len(upto) > start:
                end = len(upto)
            else:
                end = self._find(text, message["content"], start) + len(message["content"])
                end += len(self.turn_end) if self.turn_end and text.startswith(self.turn_end, end) else 0
            spans.append((start, end))
            cursor = end
        return spans

    def _render_or_none(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
        # A template may refuse a prefix (e.g. one that must start with a user turn).
        try:
            return self.apply_chat_template(messages, add_generation_prompt)
        except DataError:
            return None

    def _find(self, text: str, content: str, start: int) -> int:
        at = text.find(content, start)
        if at < 0:
            raise DataError(f"{self.source}: cannot locate an assistant message in the rendered chat "
                            f"(the chat template changes its content); cannot mask the prompt")
        return at

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
        return text[at + len(_PROBE):].rstrip() if at >= 0 else ""
