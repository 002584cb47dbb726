"""The built-in task data of the demos and tiny examples: ``copy:`` / ``lower:`` (a base skill)
and ``upper: <word>`` (the task an adapter learns), as instruction rows and JSONL files; and the
same task as preference pairs (``upper_pairs``: the upper-case word chosen over the word as it is)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

LETTERS = string.ascii_lowercase


def random_word(rng: random.Random, mixed: bool) -> str:
    w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return "".join(c.upper() if mixed and rng.random() < 0.5 else c for c in w) if mixed else w


def make_rows(task: str, n: int, seed: int) -> list[dict]:
    """``n`` rows of ``task``: ``"base"`` (copy/lower of mixed-case words), ``"upper"`` or
    ``"upper_pairs"`` (prompt, chosen, rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if task == "base":
            word = random_word(rng, mixed=True)
            kind = rng.choice(["copy", "lower"])
            rows.append({"instruction": f"{kind}: {word}", "output": word if kind == "copy" else word.lower()})
        elif task == "upper_pairs":
            word = random_word(rng, mixed=False)
            rows.append({"prompt": f"upper: {word}", "chosen": word.upper(), "rejected": word})
        else:
            word = random_word(rng, mixed=False)
            rows.append({"instruction": f"upper: {word}", "output": word.upper()})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
