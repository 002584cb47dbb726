"""Choosing and loading a run's tokenizer: the built-in byte tokenizer or a Hugging Face folder.

Kept apart from :mod:`.tokenizer` (the protocol and the byte tokenizer) because it imports
:mod:`.hf_tokenizer`, which itself builds on the protocol.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moetune.data.tokenizer import ByteTokenizer, Tokenizer
from moetune.errors import ConfigError, DataError, MoetuneError

log = logging.getLogger(__name__)


def load_tokenizer(spec: str) -> Tokenizer:
    """Load ``"byte"`` (the built-in :class:`ByteTokenizer`) or a Hugging Face tokenizer folder.

    Args:
        spec: ``"byte"``, or a folder holding ``tokenizer.json`` (and usually
            ``tokenizer_config.json``), e.g. the base model's folder.

    Raises:
        DataError: the folder or its ``tokenizer.json`` is missing or unreadable.
    """
    if spec == "byte":
        return ByteTokenizer()
    folder = Path(spec)
    if not folder.is_dir():
        raise DataError(f"tokenizer folder not found: {folder} (use 'byte' for the built-in tokenizer)")
    if not (folder / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer.json in {folder}; moetune reads fast-tokenizer folders only")
    try:
        # Imported here: `tokenizers` and `jinja2` are optional, unneeded for the byte tokenizer.
        from moetune.data.hf_tokenizer import HFTokenizer
    except ImportError as err:
        raise MoetuneError(
            f"loading {folder} needs the optional packages: pip install 'moetune[tokenizers]' ({err})"
        ) from None
    return HFTokenizer.from_folder(folder)


def resolve_tokenizer(spec: str | None, model_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a run, or of ``eval``/``generate`` on a model: one rule for all of them.

    Args:
        spec: ``"byte"``, a tokenizer folder, or None (or "") for the model's own: the
            ``tokenizer.json`` in ``model_path``; when that folder has none, the byte tokenizer,
            said in one WARNING naming the folder.
        model_path: the base model's folder.
    """
    if spec:
        return load_tokenizer(spec)
    if (Path(model_path) / "tokenizer.json").is_file():
        return load_tokenizer(str(model_path))
    log.warning(
        "no tokenizer.json in the model folder %s: using the built-in byte tokenizer (set "
        "data.tokenizer / --tokenizer to a tokenizer folder, or to 'byte' to say so)",
        model_path,
    )
    return ByteTokenizer()


def check_tokenizer_fits(tokenizer: Tokenizer, model_vocab: int, *, key: str, advice: str) -> None:
    """Refuse a tokenizer with more tokens (added tokens included) than the model has embedding rows.

    The whole tokenizer is checked rather than the ids of the rows or prompts at hand, so that train,
    eval and generate agree on which tokenizers fit a model, and a file that happens to avoid the
    extra tokens today does not crash on the next one.

    Args:
        key: what the tokenizer was given as (``data.tokenizer``, ``--tokenizer``, ...), for the message.
        advice: what to do instead.

    Raises:
        ConfigError: naming ``key``, both sizes and ``advice``.
    """
    if tokenizer.vocab_size > model_vocab:
        raise ConfigError(
            f"{key} has {tokenizer.vocab_size} tokens but the model's vocabulary is {model_vocab}; {advice}"
        )
