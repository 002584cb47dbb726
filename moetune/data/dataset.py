"""Datasets: the ``data:`` section -> tokenised train and eval examples.

:func:`build_datasets` reads the files, holds out the eval split (:func:`split_rows`), tokenises
and cuts the rows, and reports the counts (:class:`DataReport`). The order in which training
rows are consumed, and the loaders, are in :mod:`moetune.data.sampling`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from moetune.config import DataSection
from moetune.data.examples import Example, tokenize_row
from moetune.data.formats import LoadedRows, Row, load_rows
from moetune.data.tokenizer import Tokenizer
from moetune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    """Counts from building the datasets, for the run log."""

    format: str
    train_examples: int = 0
    eval_examples: int = 0
    skipped_rows: int = 0  # bad rows left out (data.skip_bad_rows)
    truncated: int = 0  # rows cut at max_length ...
    lost_endings: int = 0  # ... of which the end of the last response was lost
    dropped: int = 0  # rows with no loss tokens left after the cut
    train_tokens: int = 0
    learnt_tokens: int = 0  # tokens that count in the loss

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"data: {self.train_examples} train / {self.eval_examples} eval examples ({self.format}), "
            f"{self.train_tokens} train tokens, {self.learnt_tokens} with loss; {self.skipped_rows} bad "
            f"rows skipped, {self.truncated} truncated ({self.lost_endings} lose the end of their last "
            f"response), {self.dropped} dropped (no loss tokens left)"
        )


@dataclass
class _Cuts:
    """Truncation counts of one file, for one log line about it."""

    rows: int = 0
    truncated: int = 0
    lost_endings: int = 0
    longest: int = 0

    def log(self, path: str, max_length: int) -> None:
        """WARNING when responses lost their ends (the model never learns to stop), else INFO."""
        if self.lost_endings:
            log.warning(
                "%s: %d of %d rows lose the end of their last response (its end-of-turn / eos "
                "token) to max_length=%d, so the model does not learn to stop after them; raise "
                "data.max_length (longest row: %d tokens)",
                path,
                self.lost_endings,
                self.rows,
                max_length,
                self.longest,
            )
        elif self.truncated:
            log.info(
                "%s: %d of %d rows are longer than max_length=%d and were cut after their last "
                "response (longest row: %d tokens)",
                path,
                self.truncated,
                self.rows,
                max_length,
                self.longest,
            )


@dataclass
class DataSplits:
    """Tokenised train and eval examples (eval may be empty) and the report."""

    train: list[Example]
    eval: list[Example]
    report: DataReport


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out ``fraction`` of ``rows`` (at least one) for evaluation; both keep file order.

    Raises:
        DataError: nothing would be left to train on.
    """
    count = max(1, round(len(rows) * fraction))
    if count >= len(rows):
        raise DataError(f"val_fraction={fraction} holds out all {len(rows)} rows; nothing left to train on")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _tokenize_rows(
    loaded: LoadedRows, rows: list[Row], tokenizer: Tokenizer, section: DataSection, report: DataReport, cuts: _Cuts
) -> list[Example]:
    examples: list[Example] = []
    for row in rows:
        try:
            example = tokenize_row(
                row, tokenizer, max_length=section.max_length, train_on_prompt=section.train_on_prompt
            )
        except DataError as err:
            message = f"{loaded.path} line {row.line}: {err}"
            if not section.skip_bad_rows:
                raise DataError(message) from None
            log.warning("skipped %s", message)
            report.skipped_rows += 1
            continue
        report.truncated += example.truncated
        report.lost_endings += example.lost_ending
        cuts.rows, cuts.truncated = cuts.rows + 1, cuts.truncated + example.truncated
        cuts.lost_endings += example.lost_ending
        cuts.longest = max(cuts.longest, example.full_length)
        if example.num_learnt == 0:
            report.dropped += 1  # all its loss tokens were cut off; it would only cost compute
            continue
        examples.append(example)
    return examples


def _supervised(loaded: LoadedRows) -> LoadedRows:
    """Supervised rows only: preference and KTO rows name the objective that trains on them."""
    if loaded.format in ("preference", "kto"):
        objectives = "dpo, ipo, simpo or orpo" if loaded.format == "preference" else "kto"
        raise DataError(f"{loaded.path}: {loaded.format} rows are trained with optim.objective: {objectives}")
    return loaded


def build_datasets(section: DataSection, tokenizer: Tokenizer, seed: int | None = None) -> DataSplits:
    """Read, check, split and tokenise the data of a ``data:`` section.

    Args:
        section: the data config (files, format, max_length, val_fraction, ...).
        tokenizer: from :func:`moetune.data.load_tokenizer`.
        seed: seed of the validation split; defaults to ``section.seed``.

    Rows longer than ``max_length`` are cut at the end; per file, one WARNING counts the rows whose
    cut takes the end of their last response (its eos / end-of-turn token), else one INFO line
    counts the rows cut after it. The report holds the totals.

    Raises:
        DataError: a file or row is bad (see :func:`moetune.data.formats.load_rows`), or no
            training example keeps a loss token within ``max_length``.
    """
    seed = section.seed if seed is None else seed
    train_file = _supervised(load_rows(section.train, section.format, section.skip_bad_rows))
    report = DataReport(format=train_file.format, skipped_rows=train_file.skipped)
    train_rows, eval_rows, eval_file = train_file.rows, [], train_file
    if section.eval is not None:
        eval_file = _supervised(load_rows(section.eval, section.format, section.skip_bad_rows))
        eval_rows, report.skipped_rows = eval_file.rows, report.skipped_rows + eval_file.skipped
    elif section.val_fraction > 0:
        train_rows, eval_rows = split_rows(train_rows, section.val_fraction, seed)
    cuts = {train_file.path: _Cuts(), eval_file.path: _Cuts()}  # one entry when eval rows are held out
    train = _tokenize_rows(train_file, train_rows, tokenizer, section, report, cuts[train_file.path])
    evals = _tokenize_rows(eval_file, eval_rows, tokenizer, section, report, cuts[eval_file.path])
    for path, tally in cuts.items():
        tally.log(path, section.max_length)
    if not train:
        raise DataError(
            f"{section.train}: no example keeps a loss token within max_length="
            f"{section.max_length} ({report.dropped} dropped)"
        )
    report.train_examples, report.eval_examples = len(train), len(evals)
    report.train_tokens = sum(len(e) for e in train)
    report.learnt_tokens = sum(e.num_learnt for e in train)
    if report.dropped:
        log.warning("dropped %d examples with no loss token within max_length=%d", report.dropped, section.max_length)
    return DataSplits(train=train, eval=evals, report=report)
