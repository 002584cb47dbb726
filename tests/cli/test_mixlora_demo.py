"""Acceptance on the demo task: MixLoRA and a same-size LoRA, trained together, both learn it;
``moetune eval --task`` scores them by log-likelihood and prints router statistics."""

from __future__ import annotations

import json

import pytest

from moetune.cli import main
from moetune.demo_data import make_rows
from moetune.demo_mixlora import run_comparison
from moetune.errors import DataError
from moetune.evaluation import read_task
from moetune.workflows import EvalSetup, evaluate_task_files

# One thread: the tiny pre-training is hundreds of small ops a step, which a second thread slows down
# on a 2-core machine that runs anything else (measured: 1.25x the CPU time with idle OpenMP threads
# sleeping, 10x and more with them spinning); the results are the same at 1 and 2 threads.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # The dense base needs its 600 steps (at 300-450 steps, or batch 16, it has not learnt to copy
    # and no adapter learns 'upper'); 40 adapter steps are not enough on every thread count (70%).
    out = tmp_path_factory.mktemp("mixlora-demo")
    return out, run_comparison(out, base_steps=600, steps=80, held_out=50, verbose=False)


def test_mixlora_and_lora_both_learn_the_task(demo):
    _, r = demo
    assert r["base_accuracy"] <= 0.1
    assert abs(r["mixlora_params"] - r["lora_params"]) / r["lora_params"] < 0.05  # about the same size
    assert r["lora_accuracy"] >= 0.8 and r["mixlora_accuracy"] >= 0.8, r


def _task(path, n=30):
    rows = []
    for i, r in enumerate(make_rows("upper", n, 11)):
        word = r["instruction"][len("upper: ") :]
        choices = [word.upper(), word, word.capitalize()]
        rows.append(
            {
                "question": r["instruction"],
                "choices": choices if i % 2 else {"text": choices, "label": ["A", "B", "C"]},
                "answer": 0 if i % 2 else "A",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_task_scores_choices_by_log_likelihood(demo, capsys):
    out, _ = demo
    task = _task(out / "upper_mc.jsonl")
    base = evaluate_task_files(EvalSetup(out / "base-model"), [task], chat=True)[0]
    mix = evaluate_task_files(EvalSetup(out / "base-model", out / "run" / "adapter-mixlora"), [task], chat=True)[0]
    assert base.accuracy_norm < 0.5 and mix.accuracy_norm >= 0.9 and mix.questions == 30
    assert "model.layers.0.mlp" in mix.router and "entropy" in mix.router
    args = ["--model", str(out / "base-model"), "--adapter", str(out / "run" / "adapter-lora"), "--task", str(task)]
    assert main(["eval", *args, "--chat"]) == 0  # the command line, in this process (no second interpreter)
    printed = capsys.readouterr().out
    assert "upper_mc.jsonl: accuracy_norm" in printed and "(headline" in printed


def test_task_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"], "answer": 0}\n'
    )
    with pytest.raises(DataError, match="bad.jsonl line 2: 'choices'"):
        read_task(bad)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": "D"}\n')
    with pytest.raises(DataError, match="line 1: answer 'D'"):
        read_task(bad)
