"""Reference log-probs computed once (``optim.preference.precompute_reference``).

Before the first step, every training example's two sequences are scored by the base with every
adapter off (one forward per batch, without gradient); the (N, 2) table goes to
``reference_logps.safetensors`` in the run folder, written atomically (a temporary file renamed
into place) as one of the run's recorded entries. Its metadata holds the objective and a SHA-256 of
the examples' token ids and labels: a resumed run reads the table back when both match, and
computes it again (with a warning) when the data changed. Each rank computes the whole table, so
every rank can look up any example; rank 0 writes it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..data.preference import PreferenceExample, preference_batches
from ..outputs import write_file_atomic
from .logps import INPUTS, sequence_logps

REFERENCE_FILE = "reference_logps.safetensors"
log = logging.getLogger(__name__)


def fingerprint(examples: Sequence[PreferenceExample]) -> str:
    """SHA-256 of the examples' token ids and labels, in order."""
    digest = hashlib.sha256()
    for e in examples:
        for seq in (e.first, e.second):
            digest.update(torch.tensor([*seq.input_ids, -1, *seq.labels, -2], dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


class ReferenceTable:
    """(N, 2) reference log-probs: column 0 of each example's first sequence, column 1 of its second."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """(2B,) for examples ``index`` (B,): their first sequences, then their second ones."""
        picked = self.table[index.cpu()]
        return torch.cat((picked[:, 0], picked[:, 1]))


@torch.no_grad()
def compute_table(
    model,
    examples: Sequence[PreferenceExample],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], ContextManager],
    adapter: str | None = None,
) -> torch.Tensor:
    """(N, 2) fp32 log-probs of every example's sequences under the base (adapters off; or with
    only ``adapter``), in eval mode."""
    table, was_training = torch.zeros(len(examples), 2), model.training
    model.eval()
    for batch in preference_batches(examples, batch_size=batch_size, pad_id=pad_id):
        index = batch.pop("example_index")
        inputs = {k: batch[k].to(device) for k in INPUTS}
        with autocast():
            logps = sequence_logps(model, inputs, [adapter] * inputs["input_ids"].shape[0])[0]
        table[index] = logps.float().cpu().view(2, -1).T
    model.train(was_training)
    return table


def read_table(path: Path, objective: str, digest: str, count: int) -> torch.Tensor | None:
    """The table in ``path`` if it was computed for this objective and data, else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("reference_logps")
    except (SafetensorError, OSError, RuntimeError):
        return None
    if meta.get("objective") != objective or meta.get("fingerprint") != digest or table.shape != (count, 2):
        return None
    return table


def reference_table(trainer, objective: str, adapter: str | None = None) -> ReferenceTable:
    """The run's precomputed reference table (the base, or with only ``adapter``): read back when it
    is there and matches, else computed (and written by rank 0)."""
    job = trainer.jobs[0]
    objective = objective if adapter is None else f"{objective}, reference {adapter}"
    examples, digest = job.data.train, fingerprint(job.data.train)
    path = trainer.folder.entry(REFERENCE_FILE) if trainer.parallel.is_main else trainer.out / REFERENCE_FILE
    trainer.parallel.barrier()  # every rank reads the folder as it was before rank 0 writes
    table = read_table(path, objective, digest, len(examples)) if path.exists() else None
    if trainer.parallel.all_ok(table is not None):  # every rank agrees: under FSDP all compute, or none
        return ReferenceTable(table)
    if path.exists() and trainer.parallel.is_main:
        log.warning("%s was computed for other data or another objective: computing it again", path)
    table = compute_table(
        trainer.model,
        examples,
        batch_size=job.optim.batch_size,
        pad_id=trainer.parts.tokenizer.pad_id,
        device=trainer.device,
        autocast=trainer.autocast,
        adapter=adapter,
    )
    if trainer.parallel.is_main:
        meta = {"objective": objective, "fingerprint": digest}
        write_file_atomic(path, lambda tmp: save_file({"reference_logps": table}, str(tmp), metadata=meta))
    trainer.parallel.barrier()
    return ReferenceTable(table)
