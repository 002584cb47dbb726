"""Collation: rows of examples -> padded LongTensor batches.

A batch is a dict of ``(B, T)`` int64 tensors, ``T`` the longest row in the batch (rounded up to
``pad_to_multiple_of``), right-padded:

- ``input_ids``: token ids; ``pad_id`` on padding.
- ``attention_mask``: 1 on real tokens, 0 on padding.
- ``labels``: the examples' labels; -100 on padding.
- ``position_ids``: 0, 1, 2, ... restarting at 0 for each example of a packed row; 0 on padding.
- ``segment_ids`` (packing only): 1, 2, 3, ... per example within a row; 0 on padding. The model
  attends only within one segment.

Without packing every row holds one example, so ``position_ids`` is ``arange`` on real tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moetune.data.examples import IGNORE, Example


class Collator:
    """Turn a list of rows (each a list of examples) into a padded batch dict."""

    def __init__(self, *, pad_id: int, packing: bool = False, pad_to_multiple_of: int = 1) -> None:
        """
        Args:
            pad_id: id written on padded positions of ``input_ids``.
            packing: rows may hold several examples; adds ``segment_ids``.
            pad_to_multiple_of: round ``T`` up to a multiple of this (e.g. 8 for tensor cores).
        """
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = pad_id
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Sequence[Example]]) -> dict[str, torch.Tensor]:
        if not rows or any(not row for row in rows):
            raise ValueError("cannot collate an empty batch or an empty row")
        if not self.packing and any(len(row) > 1 for row in rows):
            raise ValueError("a row holds several examples but the collator was built with packing=False")
        lengths = [sum(len(example) for example in row) for row in rows]
        multiple = self.pad_to_multiple_of
        width = -(-max(lengths) // multiple) * multiple
        shape = (len(rows), width)
        batch = {
            "input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "labels": torch.full(shape, IGNORE, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
        }
        if self.packing:
            batch["segment_ids"] = torch.zeros(shape, dtype=torch.long)
        for b, row in enumerate(rows):
            self._fill(batch, b, row)
        return batch

    def _fill(self, batch: dict[str, torch.Tensor], b: int, row: Sequence[Example]) -> None:
        start = 0
        for segment, example in enumerate(row, start=1):
            end = start + len(example)
            batch["input_ids"][b, start:end] = torch.tensor(example.input_ids, dtype=torch.long)
            batch["labels"][b, start:end] = torch.tensor(example.labels, dtype=torch.long)
            batch["attention_mask"][b, start:end] = 1
            batch["position_ids"][b, start:end] = torch.arange(len(example))
            if self.packing:
                batch["segment_ids"][b, start:end] = segment
            start = end
