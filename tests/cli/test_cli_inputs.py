"""The inference-side commands keep what the user had: the checkpoint's dtype, its tokenizer and
generation config in merged folders, training checkpoints as adapters; bad numbers are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from moetune.cli import build_parser, main
from moetune.tiny_models import tiny_moe_args
from moetune.model import build_random_model
from moetune.workflows import EvalSetup, evaluate_file, generate_text, load_with_adapter, merge_to_checkpoint
from tokenizer_helpers import make_hf_tokenizer
from train_helpers import write_run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetune", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A bf16 base with a tokenizer and generation config, and a 4-step run with checkpoints on it."""
    root = tmp_path_factory.mktemp("bf16")
    base = root / "base"
    build_random_model(tiny_moe_args(272), seed=0, std=0.05).to(torch.bfloat16).save_pretrained(base)
    make_hf_tokenizer(base, vocab_size=270)
    (base / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "eos_token_id": 2}) + "\n")
    cfg = write_run(
        root,
        optim={"lr": 3e-3, "max_steps": 4, "batch_size": 8},
        checkpoint={"output_dir": str(root / "run"), "save_every": 2, "keep_last": 3},
        data={"train": str(root / "train.jsonl"), "max_length": 48},
    )
    assert main(["train", str(cfg), "model.dtype=fp32"]) == 0
    return root, base


def test_bad_numbers_are_one_line_errors():
    cases = [
        ("generate", "--max-new-tokens", "0"),
        ("generate", "--temperature", "-1"),
        ("generate", "--top-p", "2"),
        ("eval", "--batch-size", "0"),
        ("eval", "--max-length", "x"),
    ]
    for cmd, flag, value in cases:
        extra = ["--prompt", "hi"] if cmd == "generate" else ["--data", "d.jsonl"]
        proc = _cli(cmd, "--model", "m", *extra, flag, value)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and flag in proc.stderr, proc.stderr


def test_version_and_every_option_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("moetune ")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    train_help = " ".join(subparsers["train"].format_help().split())
    assert "Relative paths in the YAML file resolve against the folder the YAML file is in" in train_help
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"moetune {name} {action.option_strings or action.dest} has no help text"
        shown = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False) and action.default != "==SUPPRESS==":
                assert f"(default: {action.default})" in " ".join(shown.split()), (name, action.dest)


def test_merge_keeps_dtype_tokenizer_and_generation_config(bf16_run, tmp_path):
    root, base = bf16_run
    out = merge_to_checkpoint(base, root / "run" / "adapter", tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"} and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    merged = generate_text(out, ["abc"], chat=False)
    adapted = generate_text(base, ["abc"], adapter=str(root / "run" / "adapter"), chat=False)
    assert merged == adapted


def test_merge_tokenizer_option_is_honoured_or_rejected(bf16_run, tmp_path):
    root, base = bf16_run
    other = tmp_path / "tok"
    other.mkdir()
    make_hf_tokenizer(other, vocab_size=200)
    out = merge_to_checkpoint(base, root / "run" / "adapter", tmp_path / "m1", tokenizer=str(other))
    assert (out / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").is_file()
    inputs = ["--model", str(base), "--adapter", str(root / "run" / "adapter")]
    proc = _cli("merge", *inputs, "--out", str(tmp_path / "m2"), "--tokenizer", "byte")
    assert proc.returncode == 2 and "byte" in proc.stderr and not (tmp_path / "m2").exists()
    proc = _cli("export", *inputs, "--out", str(tmp_path / "e"), "--tokenizer", str(other))
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr


def test_eval_defaults_to_the_checkpoint_dtype(bf16_run):
    root, base = bf16_run
    model, _ = load_with_adapter(base, None)
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_with_adapter(base, None, dtype="fp32")
    assert next(model.parameters()).dtype == torch.float32


def test_a_training_checkpoint_works_as_adapter(bf16_run):
    root, base = bf16_run
    checkpoint = root / "run" / "checkpoints" / "checkpoint-00000004"
    final = root / "run" / "adapter"
    from_checkpoint = evaluate_file(EvalSetup(base, str(checkpoint), dtype="fp32"), root / "val.jsonl")
    from_folder = evaluate_file(EvalSetup(base, str(final), dtype="fp32"), root / "val.jsonl")
    assert from_checkpoint.loss == pytest.approx(from_folder.loss, abs=1e-6)
    base_only = evaluate_file(EvalSetup(base, dtype="fp32"), root / "val.jsonl")
    assert abs(base_only.loss - from_folder.loss) > 1e-4  # the adapter does something
    proc = _cli(
        "generate",
        "--model",
        str(base),
        "--adapter",
        str(checkpoint),
        "--prompt",
        "abc",
        "--raw",
        "--max-new-tokens",
        "4",
    )
    assert proc.returncode == 0, proc.stderr


def test_overrides_may_follow_flags_and_verbose_may_follow_the_command(tmp_path, capsys):
    cfg = write_run(tmp_path, optim={"lr": 3e-3, "max_steps": 2, "batch_size": 8})
    assert main(["train", str(cfg), "--print-config", "optim.lr=0.25", "adapter.r=3"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.25" in printed and "r: 3" in printed
    assert main(["train", "-v", str(cfg), "--print-config"]) == 0
    proc = _cli("train", str(cfg), "--print-config", "--no-such-flag")
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = _cli("eval", "--model", "m", "--data", "d.jsonl", "optim.lr=1")  # no overrides there
    assert proc.returncode == 2 and "unrecognized arguments: optim.lr=1" in proc.stderr
