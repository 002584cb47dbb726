"""What eval, generate and export check before they run: a tokenizer larger than the model's vocabulary
is refused as train refuses it, a LoRA adapter is not exported in MoE-PEFT's MixLoRA layout, and a prompt
reaches the model in the format training gave an instruction row (chat template or ### Instruction)."""

from __future__ import annotations

from pathlib import Path

import pytest

import moetune
from moetune.cli import main
from moetune.data import InstructionRow, instruction_prompt, resolve_tokenizer, tokenize_row
from moetune.errors import AdapterError
from moetune.evaluation import Question, score_task
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


def _training_prompt(tok, instruction: str) -> list[int]:
    example = tokenize_row(InstructionRow(instruction=instruction, output="hello"), tok, max_length=512)
    return example.input_ids[: next(i for i, label in enumerate(example.labels) if label != -100)]


def test_generate_prompts_in_the_training_format_and_raw_sends_the_text(folders, monkeypatch):
    root, fits, *_ = folders
    import moetune.workflows as workflows

    sent = []
    real = workflows.generate
    monkeypatch.setattr(workflows, "generate", lambda model, ids, **kw: sent.append(ids) or real(model, ids, **kw))
    tok = resolve_tokenizer(None, fits)
    assert not tok.has_chat_template
    workflows.generate_text(fits, ["say hi"], max_new_tokens=1)
    assert sent[-1] == [_training_prompt(tok, "say hi")]
    assert tok.decode(sent[-1][0]) == "### Instruction:\nsay hi\n\n### Response:\n"
    workflows.generate_text(fits, ["say hi"], max_new_tokens=1, chat=False)
    assert tok.decode(sent[-1][0]) == "say hi"


def test_task_chat_asks_in_the_training_format(folders):
    root, fits, *_ = folders
    model, tok = moetune.load_model(fits), resolve_tokenizer(None, fits)
    seen = []
    model.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    score_task(model, tok, [Question("hello?", ["world", "fox"], 0)], chat=True)
    first = [i for i in seen[0][0].tolist() if i != tok.pad_id]
    assert first == _training_prompt(tok, "hello?") + tok.encode("world")


def test_instruction_prompt_is_what_training_masks_as_the_prompt(tmp_path):
    chat = resolve_tokenizer(str(make_hf_tokenizer(tmp_path / "chat")), tmp_path)
    for tok in (chat, resolve_tokenizer("byte", tmp_path)):
        assert tok.has_chat_template
        assert instruction_prompt(tok, "say hi") == _training_prompt(tok, "say hi")


def test_train_refuses_a_tokenizer_larger_than_the_model_before_loading_it(folders, capsys, monkeypatch, tmp_path):
    import yaml

    from moetune.train import setup

    root, fits, too_small, rows, _ = folders
    monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("the weights loaded before the check"))
    run = {
        "model": {"path": str(too_small), "device": "cpu"},
        "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
        "data": {"train": str(rows), "max_length": 32},
        "optim": {"max_steps": 1, "batch_size": 1},
        "checkpoint": {"output_dir": str(tmp_path / "run")},
    }
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    err = _refused(capsys, "train", cfg)
    assert f"the tokenizer of {too_small} (data.tokenizer: null) has {TOKENS} tokens" in err, err
    assert not any((tmp_path / "run").glob("*"))  # nothing written (the folder may be made, empty)
    err = _refused(capsys, "train", cfg, f"data.tokenizer={fits}")
    assert f"data.tokenizer '{fits}' has {TOKENS} tokens" in err and "data.tokenizer: null" in err, err
