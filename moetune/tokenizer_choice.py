"""Which tokenizer ``eval`` and ``generate`` use: the one given, else the one the adapter was
trained with, else the model folder's own, else the byte tokenizer.

An adapter trained by a run whose ``data.tokenizer`` was not the model folder's own (the byte
tokenizer, a file of the user's) must be scored and prompted with that tokenizer: the model folder's
would turn the same text into other ids, and every number would be wrong without a sign of it.
The run's resolved config beside its checkpoints and adapter folder says which one it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from .data import check_tokenizer_fits, resolve_tokenizer
from .markers import read_marker
from .model.model_folder import model_args_from_folder
from .train.checkpoint_adapter import is_training_checkpoint
from .train.run_folder import RUN_CONFIG

log = logging.getLogger(__name__)


def default_tokenizer(model_path: str | os.PathLike, spec: str | None, adapter: str | os.PathLike | None = None):
    """The given tokenizer, else the adapter's run's (said in a warning), else the model folder's
    own, else the byte tokenizer (said in a warning).

    The same rule as ``data.tokenizer`` in a run (:func:`moetune.data.resolve_tokenizer`), and refused
    as a run refuses it when it has more tokens than the model's vocabulary (read from config.json, so
    before the weights load).
    """
    given = spec
    if spec is None and (trained := trained_tokenizer(adapter)) is not None:
        spec, source = trained
        log.warning("no --tokenizer given: using '%s', the tokenizer the adapter was trained with (%s)", spec, source)
    tok = resolve_tokenizer(spec, model_path)
    if given:
        key, advice = f"--tokenizer {given}", "use the model's own (drop --tokenizer)"
    elif spec:
        key, advice = f"the tokenizer '{spec}' the adapter was trained with", "give another as --tokenizer"
    else:
        key = f"the tokenizer of {model_path} (no --tokenizer given)"
        advice = "give the one it was trained with as --tokenizer"
    check_tokenizer_fits(tok, model_args_from_folder(model_path).vocab_size, key=key, advice=advice)
    return tok


def trained_tokenizer(adapter: str | os.PathLike | None) -> tuple[str, Path] | None:
    """``(data.tokenizer, run config)`` when ``adapter`` is a run's training checkpoint or its adapter
    folder and the run named a tokenizer other than the model folder's own; else None."""
    if adapter is None:
        return None
    folder = Path(adapter)
    if is_training_checkpoint(folder):
        source = folder.parent.parent / RUN_CONFIG
    else:
        marker = read_marker(folder.parent)
        if marker is None or marker.kind != "run" or folder.name not in marker.files:
            return None
        source = folder.parent / RUN_CONFIG
    try:
        spec = ((yaml.safe_load(source.read_text()) or {}).get("data") or {}).get("tokenizer")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        log.warning("could not read which tokenizer trained the adapter from %s (%s): the default is used", source, exc)
        return None
    return (str(spec), source) if spec else None
