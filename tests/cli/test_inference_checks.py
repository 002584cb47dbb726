"""What eval, generate and export check before they run: a tokenizer larger than the model's vocabulary
is refused as train refuses it, and a LoRA adapter is not exported in MoE-PEFT's MixLoRA layout."""

from __future__ import annotations

from pathlib import Path

import pytest

import moetune
from moetune.cli import main
from moetune.errors import AdapterError
from moetune.model import build_random_model
from moetune.tiny_models import tiny_moe_args
from tokenizer_helpers import make_hf_tokenizer, write_jsonl

TOKENS = 298  # make_hf_tokenizer(vocab_size=298): 293 BPE tokens and 5 specials


def _model(root: Path, vocab: int) -> Path:
    """A tiny Qwen3-MoE folder of ``vocab`` embedding rows with a 298-token tokenizer and no chat template."""
    folder = root / f"model{vocab}"
    build_random_model(tiny_moe_args(vocab), seed=0, std=0.05).save_pretrained(folder)
    make_hf_tokenizer(folder, chat_template=None, vocab_size=TOKENS)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    fits, too_small = _model(root, 300), _model(root, 200)
    model = moetune.load_model(fits)
    moetune.add_adapter(model, moetune.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "experts"]))
    moetune.save_adapter(model, root / "lora")
    rows = write_jsonl(root / "rows.jsonl", [{"instruction": "say hi", "output": "hello"}] * 2)
    task = write_jsonl(root / "task.jsonl", [{"question": "hello?", "choices": ["world", "fox"], "answer": 0}])
    return root, fits, too_small, rows, task


def _refused(capsys, *args) -> str:
    """Run the CLI in-process; a user error: exit 2, one line on stderr, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_export_for_moe_peft_refuses_a_lora_adapter_and_writes_nothing(folders, capsys):
    root, fits, *_ = folders
    for how in (["--for", "moe_peft"], ["--layout", "moe_peft"]):
        out = root / "exported"
        err = _refused(capsys, "export", "--model", fits, "--adapter", root / "lora", "--out", out, *how)
        assert str(root / "lora") in err and "MixLoRA adapters" in err and "--for peft, vllm or sglang" in err, err
        assert not out.exists()


def test_moe_peft_layout_refuses_a_lora_adapter_once_loaded(folders):
    """The path a training checkpoint takes (no adapter_config.json to read before loading)."""
    root, fits, *_ = folders
    model = moetune.load_model(fits)
    moetune.load_adapter(model, root / "lora")
    with pytest.raises(AdapterError, match="adapter 'default' is a LoRA adapter, not a mixture"):
        moetune.save_adapter(model, root / "library-export", layout="moe_peft")
    assert not (root / "library-export").exists()


def test_eval_and_generate_refuse_a_tokenizer_larger_than_the_model(folders, capsys):
    root, fits, too_small, rows, task = folders
    cases = [
        ("eval", "--model", too_small, "--data", rows),
        ("eval", "--model", too_small, "--task", task),
        ("generate", "--model", too_small, "--prompt", "say hi"),
        ("generate", "--model", too_small, "--prompt", "say hi", "--raw"),
    ]
    for args in cases:
        err = _refused(capsys, *args)
        assert f"{TOKENS} tokens but the model's vocabulary is 200" in err and str(too_small) in err, (args, err)
    err = _refused(capsys, "eval", "--model", too_small, "--data", rows, "--tokenizer", fits)
    assert f"--tokenizer {fits} has {TOKENS} tokens" in err and "drop --tokenizer" in err, err
    assert main(["generate", "--model", str(fits), "--prompt", "say hi", "--max-new-tokens", "1"]) == 0
