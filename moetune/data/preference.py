"""Preference data: prompt/completion rows -> pairs of tokenised sequences, and their batches.

A :class:`PreferenceExample` is two sequences, each a prompt followed by a completion, with labels
(-100 elsewhere) on the completion tokens only:

- a preference row (``prompt``, ``chosen``, ``rejected``): ``first`` = prompt + chosen, ``second``
  = prompt + rejected;
- a KTO row (``prompt``, ``completion``, ``label``): ``first`` = prompt + completion, ``second`` =
  the same prompt with the completion of the row before it in the split (the last row's for the
  first), which KTO's KL estimate scores, as TRL's KTO trainer does; ``label`` says whether the
  completion is desirable.

The chat template is applied as for supervised data: string prompts and completions go through
the instruction format (one user turn, one assistant turn), message lists are one conversation
whose completion is its last assistant turn(s). Sequences longer than ``max_length`` are cut at
the end, as supervised rows are; a row whose completion loses every token is dropped and counted.

A batch of B examples is one padded batch of 2B rows, all ``first`` sequences then all ``second``
ones (as TRL concatenates chosen and rejected), plus ``example_index`` (B,) (each example's place
in its split, to find precomputed reference log-probs) and, for KTO, ``kto_label`` (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from moetune.config import DataSection
from moetune.data.collate import Collator
from moetune.data.dataset import DataReport, DataSplits, split_rows
from moetune.data.examples import IGNORE, Example, encode_row
from moetune.data.formats import ChatRow, InstructionRow, KTORow, LoadedRows, PreferenceRow, RowError, Turns, load_rows
from moetune.data.sampling import BatchLoader, in_order, shuffled_loader
from moetune.data.tokenizer import Tokenizer
from moetune.errors import DataError

PAIR_FORMATS = {"pairs": "preference", "kto": "kto"}


@dataclass(frozen=True)
class PreferenceExample:
    """Two tokenised sequences of one row (see the module docstring), its index and KTO label."""

    first: Example
    second: Example
    index: int
    label: bool | None = None

    def __len__(self) -> int:
        return len(self.first) + len(self.second)


def encode_completion(prompt: Turns, completion: Turns, tokenizer: Tokenizer) -> tuple[list[int], int, list[bool]]:
    """Token ids of ``prompt`` + ``completion``, where the completion starts, and which tokens are
    the completion's (its text and end-of-turn marker, not a role header).

    Raises:
        RowError: the completion renders to no token that carries loss.
    """
    if isinstance(prompt, str):
        ids, learnt = encode_row(InstructionRow(instruction=prompt, output=completion), tokenizer)
    else:
        ids, assistant = encode_row(ChatRow(messages=[*prompt, *completion]), tokenizer)
        runs = _runs(assistant)  # one per assistant turn: keep the completion's (the last ones)
        keep = {i for start, end in runs[len(runs) - len(completion) :] for i in range(start, end)}
        learnt = [i in keep for i in range(len(ids))]
    if not any(learnt):
        raise RowError("the completion renders to no tokens")
    return ids, learnt.index(True), learnt


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _example(ids: list[int], learnt: list[bool], max_length: int) -> Example:
    full = len(ids)
    last = max(i for i, keep in enumerate(learnt) if keep)
    ids, learnt = ids[:max_length], learnt[:max_length]
    labels = [t if keep else IGNORE for t, keep in zip(ids, learnt)]
    labels[0] = IGNORE
    return Example(ids, labels, truncated=full > max_length, lost_ending=last >= max_length, full_length=full)


def _pair_example(row: PreferenceRow, tokenizer: Tokenizer, max_length: int, index: int) -> PreferenceExample:
    chosen = _example(*_drop_split(encode_completion(row.prompt, row.chosen, tokenizer)), max_length)
    rejected = _example(*_drop_split(encode_completion(row.prompt, row.rejected, tokenizer)), max_length)
    return PreferenceExample(first=chosen, second=rejected, index=index)


def _drop_split(encoded: tuple[list[int], int, list[bool]]) -> tuple[list[int], list[bool]]:
    return encoded[0], encoded[2]


def _kto_examples(encoded: list[tuple[KTORow, tuple]], max_length: int) -> list[PreferenceExample]:
    """KTO examples; the second sequence of row i is its prompt with row i-1's completion."""
    out = []
    for i, (row, (ids, split, learnt)) in enumerate(encoded):
        other_ids, other_split, other_learnt = encoded[i - 1][1]
        mismatched = (ids[:split] + other_ids[other_split:], [False] * split + other_learnt[other_split:])
        out.append(
            PreferenceExample(_example(ids, learnt, max_length), _example(*mismatched, max_length), i, row.label)
        )
    return out


def _encoded(loaded: LoadedRows, rows: list, encode, section: DataSection, report: DataReport) -> list:
    """``(row, encode(row))`` for each row; a row that cannot be encoded is an error naming its file
    and line, or (``skip_bad_rows``) skipped and counted."""
    out = []
    for row in rows:
        try:
            out.append((row, encode(row)))
        except DataError as err:
            message = f"{loaded.path} line {row.line}: {err}"
            if not section.skip_bad_rows:
                raise DataError(message) from None
            report.skipped_rows += 1
    return out


def _examples(loaded: LoadedRows, rows: list, tokenizer: Tokenizer, section: DataSection, report: DataReport) -> list:
    if loaded.format == "kto":
        encode = lambda row: encode_completion(row.prompt, row.completion, tokenizer)  # noqa: E731
        examples = _kto_examples(_encoded(loaded, rows, encode, section, report), section.max_length)
    else:
        encode = lambda row: _pair_example(row, tokenizer, section.max_length, 0)  # noqa: E731
        examples = [ex for _, ex in _encoded(loaded, rows, encode, section, report)]
    kept = []
    for ex in examples:
        report.truncated += ex.first.truncated or ex.second.truncated
        report.lost_endings += ex.first.lost_ending or ex.second.lost_ending
        if ex.first.num_learnt == 0 or (loaded.format != "kto" and ex.second.num_learnt == 0):
            report.dropped += 1  # a completion cut away entirely: nothing to score
            continue
        kept.append(PreferenceExample(ex.first, ex.second, len(kept), ex.label))
    return kept


def _load(path: str, section: DataSection, kind: str) -> LoadedRows:
    loaded = load_rows(path, section.format, section.skip_bad_rows)
    if loaded.format != PAIR_FORMATS[kind]:
        wanted = "prompt, chosen, rejected" if kind == "pairs" else "prompt, completion, label"
        raise DataError(f"{path}: {loaded.format} rows, but this objective trains on rows of {wanted}")
    return loaded


def build_preference_datasets(section: DataSection, tokenizer: Tokenizer, *, kind: str, seed: int) -> DataSplits:
    """Read, check, split and tokenise preference (``kind="pairs"``) or KTO (``kind="kto"``) data.

    Raises:
        DataError: a file or row is bad (one line naming the file and line), the file holds
            another row shape, or no example keeps a completion token within ``max_length``.
    """
    train_file = _load(section.train, section, kind)
    report = DataReport(format=train_file.format, skipped_rows=train_file.skipped)
    train_rows, eval_rows, eval_file = train_file.rows, [], train_file
    if section.eval is not None:
        eval_file = _load(section.eval, section, kind)
        eval_rows, report.skipped_rows = eval_file.rows, report.skipped_rows + eval_file.skipped
    elif section.val_fraction > 0:
        train_rows, eval_rows = split_rows(train_rows, section.val_fraction, seed)
    train = _examples(train_file, train_rows, tokenizer, section, report)
    evals = _examples(eval_file, eval_rows, tokenizer, section, report) if eval_rows else []
    if not train:
        raise DataError(f"{section.train}: no row keeps a completion token within max_length={section.max_length}")
    report.train_examples, report.eval_examples = len(train), len(evals)
    report.train_tokens = sum(len(e) for e in train)
    report.learnt_tokens = sum(e.first.num_learnt + e.second.num_learnt for e in train)
    return DataSplits(train=train, eval=evals, report=report)


class PreferenceCollator:
    """Examples -> one padded batch of their ``first`` rows then their ``second`` rows."""

    def __init__(self, *, pad_id: int) -> None:
        self.rows = Collator(pad_id=pad_id)

    def __call__(self, rows: Sequence[Sequence[PreferenceExample]]) -> dict[str, torch.Tensor]:
        examples = [e for row in rows for e in row]
        batch = self.rows([[e.first] for e in examples] + [[e.second] for e in examples])
        batch["example_index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        if examples[0].label is not None:
            batch["kto_label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
        return batch


def make_preference_loader(examples: Sequence[PreferenceExample], *, pad_id: int, **order: int) -> BatchLoader:
    """The training :class:`BatchLoader` of preference examples, in the same resumable order as SFT's
    (``order``: ``batch_size``, ``seed``, ``rank``, ``world_size`` of :func:`shuffled_loader`)."""
    return shuffled_loader([[e] for e in examples], PreferenceCollator(pad_id=pad_id), **order)


def preference_batches(
    examples: Sequence[PreferenceExample], *, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in split order (evaluation, precomputing reference log-probs), sharded over ranks as
    :func:`in_order` says."""
    collate = PreferenceCollator(pad_id=pad_id)
    for chunk in in_order(examples, batch_size=batch_size, rank=rank, world_size=world_size):
        yield collate([[e] for e in chunk])
