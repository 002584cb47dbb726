"""Which tokenizer a run uses when ``data.tokenizer`` is not given: the model folder's own.

The byte tokenizer is used only when named (``tokenizer: byte``) or when the model folder has no
``tokenizer.json`` (then one WARNING names the folder). ``train`` and ``eval``/``generate`` share
the rule, so a run and its evaluation always read the same token ids.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from moetune.config import DataSection, dump_config, load_train_config
from moetune.data import ByteTokenizer, load_rows, resolve_tokenizer, tokenize_row
from moetune.tokenizer_choice import default_tokenizer
from tokenizer_helpers import make_hf_tokenizer
from train_helpers import tiny_model_dir, write_run


def _model_with_tokenizer(root: Path) -> Path:
    """The tiny model folder (vocabulary 272) with a tokenizer.json of at most 272 tokens beside it."""
    folder = root / "model-with-tokenizer"
    shutil.copytree(tiny_model_dir(root), folder)
    make_hf_tokenizer(folder, vocab_size=270)
    return folder


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_default_is_the_model_folder_not_the_byte_tokenizer(tmp_path: Path) -> None:
    assert DataSection(train="t.jsonl").tokenizer is None
    config = load_train_config(write_run(tmp_path, data={"train": str(tmp_path / "train.jsonl")}))
    assert config.data.tokenizer is None
    assert yaml.safe_load(dump_config(config))["data"]["tokenizer"] is None  # --print-config: null
    assert "tokenizer: null" in dump_config(config)


def test_model_folder_tokenizer_is_used_when_present(tmp_path: Path, caplog) -> None:
    folder = _model_with_tokenizer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moetune"):
        tok = resolve_tokenizer(None, folder)
        assert not isinstance(tok, ByteTokenizer) and tok.source == str(folder)
        assert not isinstance(default_tokenizer(folder, None), ByteTokenizer)
    assert not _warnings(caplog)


def test_byte_tokenizer_when_named_or_when_the_folder_has_none(tmp_path: Path, caplog) -> None:
    with_tok = _model_with_tokenizer(tmp_path)
    without = tiny_model_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moetune"):
        assert isinstance(resolve_tokenizer("byte", with_tok), ByteTokenizer)  # named: no warning
    assert not _warnings(caplog)
    with caplog.at_level(logging.WARNING, logger="moetune"):
        assert isinstance(resolve_tokenizer(None, without), ByteTokenizer)
        assert isinstance(default_tokenizer(without, None), ByteTokenizer)
    warned = _warnings(caplog)
    assert len(warned) == 2 and all(str(without) in w and "byte tokenizer" in w for w in warned)
    explicit = resolve_tokenizer(str(with_tok), without)  # an explicit folder wins over the model's
    assert not isinstance(explicit, ByteTokenizer) and explicit.source == str(with_tok)


def test_a_run_without_data_tokenizer_trains_on_the_model_tokenizer(tmp_path: Path) -> None:
    from moetune.train.setup import prepare_run

    folder = _model_with_tokenizer(tmp_path)
    data = {"train": str(tmp_path / "train.jsonl"), "max_length": 48}  # no tokenizer key
    config = load_train_config(write_run(tmp_path, model={"path": str(folder), "device": "cpu"}, data=data))
    parts = prepare_run(config)
    assert not isinstance(parts.tokenizer, ByteTokenizer) and parts.tokenizer.source == str(folder)
    row = load_rows(config.data.train).rows[0]
    as_model = tokenize_row(row, parts.tokenizer, max_length=config.data.max_length)
    as_bytes = tokenize_row(row, ByteTokenizer(), max_length=config.data.max_length)
    assert parts.data.train[0].input_ids == as_model.input_ids != as_bytes.input_ids


def test_eval_and_generate_use_the_tokenizer_the_adapter_was_trained_with(tmp_path: Path, caplog) -> None:
    """A run trained with ``tokenizer: byte`` on a model folder that has its own tokenizer: its
    adapter folder and its checkpoints are scored with the byte tokenizer (said once), not the
    folder's, unless --tokenizer says otherwise."""
    from moetune.cli import main
    from moetune.workflows import EvalSetup, evaluate_file

    folder = _model_with_tokenizer(tmp_path)
    cfg = write_run(tmp_path, model={"path": str(folder), "device": "cpu"})
    cfg.write_text(cfg.read_text().replace("max_steps: 8", "max_steps: 2"))
    assert main(["train", str(cfg)]) == 0
    run, val = tmp_path / "run", tmp_path / "val.jsonl"
    byte = evaluate_file(EvalSetup(folder, run / "adapter", tokenizer="byte"), val).loss
    own = evaluate_file(EvalSetup(folder, run / "adapter", tokenizer=str(folder)), val).loss
    assert byte != own
    for adapter in (run / "adapter", run / "checkpoints" / "checkpoint-00000002"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moetune"):
            assert evaluate_file(EvalSetup(folder, adapter), val).loss == byte
        assert any("'byte', the tokenizer the adapter was trained with" in w for w in _warnings(caplog))
    assert isinstance(default_tokenizer(folder, None, run / "adapter"), ByteTokenizer)
    assert not isinstance(default_tokenizer(folder, None, tmp_path / "elsewhere"), ByteTokenizer)
