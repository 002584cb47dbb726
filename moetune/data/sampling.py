"""The resumable, rank-sharded batch order, and the loaders built on it.

:class:`ResumableSampler` gives the batch order: epoch ``e`` is a shuffle of all items seeded
with ``seed + e``; global batches of ``batch_size * world_size`` items are cut from it in order
(an incomplete last one is dropped, so every step has full, equal batches) and rank ``r`` gets
items ``[r * batch_size, (r + 1) * batch_size)`` of each. The position is a
:class:`SamplerState` ``{"epoch": e, "index": i}``, ``i`` the number of items of epoch ``e``
already consumed by all ranks together; restoring it resumes the exact same order.
:func:`make_train_loader` packs and collates training rows in that order; :func:`eval_batches`
shards the eval examples without shuffling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from moetune.data.collate import Collator
from moetune.data.examples import Example
from moetune.data.packing import pack_examples
from moetune.errors import CheckpointError, DataError


@dataclass(frozen=True)
class SamplerState:
    """Where the batch order stands: ``index`` items of epoch ``epoch`` are consumed (all ranks)."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, data: Any) -> SamplerState:
        """Read a saved state.

        Raises:
            CheckpointError: ``data`` is not ``{"epoch": int >= 0, "index": int >= 0}``.
        """
        ok = (
            isinstance(data, dict)
            and set(data) == {"epoch", "index"}
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values())
        )
        if not ok:
            raise CheckpointError(f"bad data sampler state {data!r}; expected {{'epoch': int, 'index': int}}")
        return cls(epoch=data["epoch"], index=data["index"])


class ResumableSampler:
    """Deterministic, resumable, rank-sharded batch order over ``num_items`` items."""

    def __init__(
        self, *, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        """
        Args:
            num_items: dataset size (examples, or packed rows).
            batch_size: items per batch on each rank.
            seed: epoch ``e`` is shuffled with ``seed + e``.
            rank, world_size: this process's place among the data-parallel ranks.
            shuffle: False keeps file order every epoch.

        Raises:
            DataError: the dataset is smaller than one global batch.
        """
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(
                f"need 0 <= rank < world_size and batch_size >= 1; got rank={rank}, "
                f"world_size={world_size}, batch_size={batch_size}"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise DataError(
                f"the training set has {num_items} items but one batch needs {self.global_batch} "
                f"(batch_size {batch_size} x {world_size} ranks); add data or lower batch_size"
            )
        self.batches_per_epoch = num_items // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """All item indices of ``epoch``, in the order they are consumed."""
        order = list(range(self.num_items))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def iter_from(self, state: SamplerState | None = None) -> Iterator[tuple[list[int], SamplerState]]:
        """Yield this rank's item indices per batch, with the state to resume *after* that batch.

        Runs forever (epoch after epoch); the trainer stops at ``max_steps``.
        """
        state = state or SamplerState()
        epoch, index = state.epoch, state.index
        usable = self.batches_per_epoch * self.global_batch
        while True:
            order = self.epoch_order(epoch)
            while index + self.global_batch <= usable:
                mine = order[index + self.rank * self.batch_size : index + (self.rank + 1) * self.batch_size]
                index += self.global_batch
                yield mine, SamplerState(epoch=epoch, index=index)
            epoch, index = epoch + 1, 0


class BatchLoader:
    """Collated training batches in the sampler's order, resumable from a :class:`SamplerState`."""

    def __init__(self, *, rows: Sequence[Sequence[Any]], sampler: ResumableSampler, collator: Callable) -> None:
        if len(rows) != sampler.num_items:
            raise ValueError(f"{len(rows)} rows but the sampler expects {sampler.num_items}")
        self.rows, self.sampler, self.collator = rows, sampler, collator

    def iter_from(self, state: SamplerState | None = None) -> Iterator[tuple[dict[str, torch.Tensor], SamplerState]]:
        """Yield ``(batch, state after it)`` forever; save the state to resume after that batch."""
        for indices, after in self.sampler.iter_from(state):
            yield self.collator([self.rows[i] for i in indices]), after


def shuffled_loader(
    rows: Sequence[Sequence[Any]], collator: Callable, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> BatchLoader:
    """``rows`` collated in the resumable, rank-sharded order of :class:`ResumableSampler`."""
    sampler = ResumableSampler(num_items=len(rows), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    return BatchLoader(rows=rows, sampler=sampler, collator=collator)


def make_train_loader(
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    pad_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> BatchLoader:
    """The training :class:`BatchLoader`: packs (if asked), then shards and shuffles rows."""
    rows = pack_examples(examples, max_length) if packing else [[example] for example in examples]
    collator = Collator(pad_id=pad_id, packing=packing)
    return shuffled_loader(rows, collator, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)


def in_order(items: Sequence[Any], *, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[list[Any]]:
    """Rank ``r``'s items ``r, r + W, r + 2W, ...`` in file order, ``batch_size`` at a time: every item is
    seen once across ranks; the last batch may be smaller."""
    mine = list(items[rank::world_size])
    for start in range(0, len(mine), batch_size):
        yield mine[start : start + batch_size]


def eval_batches(
    examples: Sequence[Example], *, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Unpacked eval batches in file order, sharded over ranks as :func:`in_order` says."""
    collator = Collator(pad_id=pad_id)
    for chunk in in_order(examples, batch_size=batch_size, rank=rank, world_size=world_size):
        yield collator([[example] for example in chunk])
