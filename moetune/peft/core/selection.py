"""Which rows each adapter runs on when a batch names one adapter per sample, known on the host.

``adapter_names`` (one per sample) is a host list, so everything about which tokens an adapter
owns is known without looking at the device: its samples, as maximal runs of consecutive samples,
and so its token rows (``T`` per sample) and, in an MoE layer, its routed rows (``k`` per token).
Adapter layers use this to run each adapter's low-rank product on its own rows only (gathered
with static sizes: slices, or an index built on the device) instead of on every row with a mask,
and never read a row count back from the device.

Legend: B samples, T tokens per sample, N = B*T token rows, S distinct adapters of the batch.
Slot ``s < S`` is the s-th distinct adapter name in order of first appearance; slot S is every
sample that names no adapter (None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SampleRuns", "cat"]


@dataclass(frozen=True)
class SampleRuns:
    """The per-sample adapter choice of one forward, as host data.

    Attributes:
        batch_size: B.
        seq_len: T.
        names: the distinct adapter names the batch asks for, in order of first appearance.
        runs: maximal runs of consecutive samples with the same choice, ``(first, end, slot)``.
    """

    batch_size: int
    seq_len: int
    names: tuple[str, ...]
    runs: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, adapter_names: list[str | None], seq_len: int) -> SampleRuns:
        names = tuple(dict.fromkeys(n for n in adapter_names if n is not None))
        slot = {n: i for i, n in enumerate(names)}
        runs: list[tuple[int, int, int]] = []
        for i, n in enumerate(adapter_names):
            s = slot.get(n, len(names))
            if runs and runs[-1][2] == s:
                runs[-1] = (runs[-1][0], i + 1, s)
            else:
                runs.append((i, i + 1, s))
        return cls(len(adapter_names), seq_len, names, tuple(runs))

    def slot(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def segments(self, rows: range | None = None) -> list[tuple[int, int]]:
        """``(length, slot)`` of each run of the current call's rows, in row order, covering them
        all: the call on ``rows`` (some of the ``B*T`` token rows, see
        :func:`moetune.model.context.token_rows`) or on every token row."""
        lo, hi = (0, self.batch_size * self.seq_len) if rows is None else (rows.start, rows.stop)
        T, out = self.seq_len, []
        for first, end, s in self.runs:
            a, b = max(first * T, lo), min(end * T, hi)
            if a < b:
                out.append((b - a, s))
        return out

    def tokens_per_slot(self) -> list[int]:
        """Token rows of each slot (S + 1 entries, the last for samples without an adapter)."""
        counts = [0] * (len(self.names) + 1)
        for first, end, s in self.runs:
            counts[s] += (end - first) * self.seq_len
        return counts

    def slot_of_token(self, device: torch.device) -> torch.Tensor:
        """(N,) int64 slot of each token row, built on the device from the runs (no host copy)."""
        parts = [
            torch.full(((end - first) * self.seq_len,), s, dtype=torch.long, device=device)
            for first, end, s in self.runs
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def sample_mask(self, name: str, device: torch.device) -> torch.Tensor:
        """(B,) bool: which samples use ``name``; filled on the device (no host copy)."""
        mask = torch.zeros(self.batch_size, dtype=torch.bool, device=device)
        slot = self.slot(name)
        for first, end, s in self.runs:
            if s == slot:
                mask[first:end] = True
        return mask


def cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
