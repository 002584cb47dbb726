"""Greedy packing of tokenised examples into rows of at most ``max_length`` tokens.

Algorithm (best-fit decreasing, deterministic): take the examples longest first (ties in input
order); put each into the open row with the least room that still fits it, or open a new row.
Rows keep their opening order and examples keep the order they were placed in. An example is
never split: examples are already cut to ``max_length`` when tokenised, so each one fits a row.

Packing happens once, before the epochs; the sampler shuffles the packed rows each epoch.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Sequence

from moetune.data.examples import Example


def pack_examples(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Pack ``examples`` into rows holding at most ``max_length`` tokens each.

    Args:
        examples: tokenised examples, each at most ``max_length`` long.
        max_length: the row capacity in tokens.

    Returns:
        The rows; each is a list of examples whose lengths sum to at most ``max_length``.

    Raises:
        ValueError: an example is longer than ``max_length`` (tokenise with the same limit).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[Example]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row index), sorted: a best-fit search is one bisect
    for i in order:
        length = len(examples[i])
        if length > max_length:
            raise ValueError(f"example {i} has {length} tokens, more than max_length={max_length}")
        at = bisect_left(room, (length, -1))
        if at < len(room):
            left, row = room.pop(at)
        else:
            left, row = max_length, len(rows)
            rows.append([])
        rows[row].append(examples[i])
        if left > length:
            insort(room, (left - length, row))
    return rows


def packing_efficiency(rows: Sequence[Sequence[Example]], max_length: int) -> float:
    """Fraction of the row capacity filled by real tokens (1.0 is perfect)."""
    if not rows:
        return 0.0
    return sum(len(example) for row in rows for example in row) / (len(rows) * max_length)
