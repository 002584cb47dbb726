"""Print the JSON lines of bench scripts (a file, or stdin) as one aligned table.

python bench/table.py results.jsonl
"""

from __future__ import annotations

import json
import sys

COLUMNS = [
    ("step", "step"),
    ("case", "case"),
    ("tool", "tool"),
    ("lora", "lora"),
    ("compiled", "compiled"),
    ("tokens_per_s", "tokens/s"),
    ("step_ms", "step ms"),
    ("ms", "block ms"),
    ("peak_gib", "peak GiB"),
    ("mfu", "MFU"),
    ("first_loss", "first loss"),
    ("together_wall_s", "together s"),
    ("apart_wall_s", "apart s"),
    ("throughput_ratio_wall", "together x"),
    ("max_loss_diff", "loss diff"),
    ("max_abs_diff_vs_transformers", "max |diff|"),
    ("seconds", "seconds"),
    ("rc", "rc"),
    ("summary", "summary"),
    ("error", "error"),
]


def table(rows: list[dict]) -> str:
    cols = [(key, title) for key, title in COLUMNS if any(key in r for r in rows)]
    cells = [[title for _, title in cols]] + [[_cell(r.get(key, "")) for key, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = open(argv[0]).read() if argv else sys.stdin.read()
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
