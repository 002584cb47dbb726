"""bench/train_step.py runs on CPU, and both tools compute the same first-step loss."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_step_bench_tiny_cpu():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_step.py"),
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--cases",
            "attention+experts",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    by_tool = {r["tool"]: r for r in rows}
    assert set(by_tool) == {"moetune", "transformers+peft"}
    assert abs(by_tool["moetune"]["first_loss"] - by_tool["transformers+peft"]["first_loss"]) < 1e-4
