"""Training terms beyond the LM cross-entropy: AdaLoRA's regulariser and rank allocation, and
distillation towards a teacher. The trainer asks one :class:`Objectives` object for them; with
neither configured every call is a no-op.

Distillation (``optim.distill``): ``weight * T^2 * KL(softmax(t / T) || softmax(s / T))``, the mean
over the positions whose next token carries a label (the same positions the cross-entropy
counts), with student logits s and teacher logits t computed without gradient. Teachers:

- ``base``: the same model with every adapter off (:func:`~moetune.peft.base.disable_adapters`);
- ``adapter:<name>``: the same model with only that adapter, a ``frozen`` adapter of the run
  (it is taken out of the student's active adapters, so the student does not contain it);
- ``file:<path>``: logits saved by :func:`save_teacher_logits` (safetensors, keys
  ``input_ids.{i}`` (L,) and ``logits.{i}`` (L, V)), looked up by each example's token ids, so
  shuffling and packing do not matter. The file is read into memory once.

Teacher forwards run in eval mode (no adapter dropout) and the student's full logits are kept
for the KL (``return_logits``), so distillation costs one more forward and (B, T, V) logits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import DistillSection, TrainConfig
from ..errors import AdapterError, CheckpointError, ConfigError
from ..model.loss import IGNORE_INDEX, shift_labels
from ..outputs import record_entries
from ..peft.adalora.allocator import (
    allocators,
    orth_regularization,
    rank_pattern,
    svd_adapter_names,
    update_and_allocate,
)
from ..peft.formats.adalora import save_adalora
from ..peft.core.layer import disable_adapters, set_active_adapters

_INPUTS = ("input_ids", "attention_mask", "position_ids", "segment_ids")
log = logging.getLogger(__name__)


class Objectives:
    """What the trainer adds to the loss and does after each optimizer step.

    Args:
        config: the run (``adapters[*].adalora``, ``optim.distill``).
        model: the model with the run's adapters already added and set active.
    """

    def __init__(self, config: TrainConfig, model: nn.Module) -> None:
        self.adalora = any(a.adalora is not None and not a.frozen for a in config.adapters)
        self.distill = config.optim.distill
        self.teacher_file = None
        if self.distill is not None and self.distill.kind == "adapter":
            student = [a.name for a in config.adapters if a.name != self.distill.target]
            set_active_adapters(model, student)  # the teacher adapter is not part of the student
        if self.distill is not None and self.distill.kind == "file":
            self.teacher_file = TeacherFile(self.distill.target)

    @property
    def forward_kwargs(self) -> dict:
        """Extra arguments of the student's forward (distillation needs its logits)."""
        return {"return_logits": True} if self.distill is not None else {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], out) -> torch.Tensor | None:
        """The terms to add to this micro-batch's loss, or None."""
        terms = []
        if self.adalora:
            orth = orth_regularization(model)
            if orth is not None:
                terms.append(orth)
        if self.distill is not None and self.distill.weight:
            teacher = self.teacher_logits(model, batch)
            terms.append(
                self.distill.weight * distill_loss(out.logits, teacher, batch["labels"], self.distill.temperature)
            )
        return sum(terms[1:], terms[0]) if terms else None

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, V) teacher logits for ``batch``."""
        if self.teacher_file is not None:
            return self.teacher_file.lookup(batch)
        inputs = {k: batch[k] for k in _INPUTS if k in batch}
        was_training = model.training
        model.eval()
        try:
            if self.distill.kind == "base":
                with disable_adapters(model):
                    return model(**inputs).logits
            names = [self.distill.target] * batch["input_ids"].shape[0]
            return model(**inputs, adapter_names=names).logits
        finally:
            model.train(was_training)

    def after_step(self, model: nn.Module, step: int) -> dict[str, int]:
        """After the optimizer step (1-based ``step``): AdaLoRA importance and masks; returns
        each AdaLoRA adapter's rank budget."""
        return update_and_allocate(model, step) if self.adalora else {}

    def allocator_state(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Each trained AdaLoRA adapter's allocator state (EMAs, masks), for the checkpoint."""
        return {name: alloc.state_dict() for name, alloc in allocators(model).items()} if self.adalora else {}

    def load_allocator_state(
        self,
        model: nn.Module,
        saved: dict[str, dict[str, torch.Tensor]],
        *,
        where: str,
        copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        """Restore :meth:`allocator_state` from checkpoint ``where``. A checkpoint without it (written
        before moetune saved it) resumes with a warning: the importance EMAs restart from zero and
        the masks are rebuilt from the zeroed Lambda entries."""
        if not self.adalora:
            return
        for name, alloc in allocators(model).items():
            if name in saved:
                try:
                    alloc.load_state_dict(saved[name], copy=copy)
                except AdapterError as err:
                    raise CheckpointError(f"checkpoint '{where}': {err}") from None
                continue
            log.warning(
                "checkpoint '%s' has no AdaLoRA allocator state for adapter '%s' (written by an earlier moetune): "
                "its importance EMAs restart from zero and its masks are rebuilt from the zeroed Lambda entries, "
                "so rank allocation can differ from an uninterrupted run",
                where,
                name,
            )
            alloc.masks_from_lambda()

    def finish(self, model: nn.Module, adapter_dirs: dict[str, Path]) -> None:
        """Next to each saved AdaLoRA adapter, its final kept-triplet pattern (``rank_pattern.json``)
        and, when it adapts linears only, PEFT's AdaLoRA layout (``adalora/``)."""
        if not self.adalora:
            return
        for name in svd_adapter_names(model):
            if name not in adapter_dirs:
                continue
            out = Path(adapter_dirs[name])
            record_entries(out, ["rank_pattern.json", "adalora"])  # moetune's, replaced with the folder
            (out / "rank_pattern.json").write_text(json.dumps(rank_pattern(model, name)) + "\n")
            try:
                save_adalora(model, out / "adalora", name)
            except AdapterError:  # routed experts: PEFT's AdaLoRA has no layer for them
                pass


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the positions t
    whose ``labels[t + 1]`` counts. student, teacher (B, T, V); labels (B, T), -100 ignored."""
    if student is None:
        raise ValueError("distillation needs the student's logits (forward with return_logits=True)")
    if teacher.shape != student.shape:
        raise ConfigError(
            f"optim.distill: teacher logits {tuple(teacher.shape)} do not match the student's "
            f"{tuple(student.shape)} (another vocabulary?)"
        )
    keep = shift_labels(labels) != IGNORE_INDEX
    if not keep.any():
        return student.sum() * 0.0
    s = F.log_softmax(student[keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[keep].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class TeacherFile:
    """Teacher logits saved per example, found by the example's token ids."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        try:
            tensors = load_file(str(self.path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ConfigError(f"optim.distill.teacher: cannot read teacher logits '{self.path}' ({exc})") from None
        self.table: dict[tuple[int, ...], torch.Tensor] = {}
        for key, ids in tensors.items():
            if key.startswith("input_ids."):
                logits = tensors.get("logits." + key.split(".", 1)[1])
                if logits is None or logits.shape[0] != ids.numel():
                    raise ConfigError(
                        f"optim.distill.teacher: '{self.path}': '{key}' has no matching 'logits.*' tensor of "
                        f"{ids.numel()} rows"
                    )
                self.table[tuple(ids.tolist())] = logits

    def lookup(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        segments = batch.get("segment_ids", mask)  # unpacked rows: one segment of real tokens
        vocab = next(iter(self.table.values())).shape[-1]
        out = torch.zeros(*ids.shape, vocab, device=ids.device)
        for b in range(ids.shape[0]):
            for seg in segments[b].unique().tolist():
                if seg == 0:
                    continue
                where = (segments[b] == seg).nonzero().squeeze(-1)
                key = tuple(ids[b, where].tolist())
                if key not in self.table:
                    raise ConfigError(
                        f"optim.distill.teacher: '{self.path}' has no logits for a training example "
                        f"(tokens {list(key[:8])}...); write it with save_teacher_logits on this data"
                    )
                out[b, where] = self.table[key].to(out)
        return out


@torch.no_grad()
def save_teacher_logits(
    model: nn.Module,
    examples: Sequence[Sequence[int]],
    path: str | Path,
    *,
    adapter: str | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Run ``model`` (with ``adapter`` only, if given) on each example's token ids and save the
    logits for ``file:`` distillation: ``input_ids.{i}`` (L,), ``logits.{i}`` (L, V) in ``dtype``."""
    was_training = model.training
    model.eval()
    tensors = {}
    try:
        for i, example in enumerate(examples):
            ids = torch.tensor([list(example)], device=next(model.parameters()).device)
            logits = model(ids, adapter_names=[adapter] if adapter else None).logits[0]
            tensors[f"input_ids.{i}"], tensors[f"logits.{i}"] = ids[0].cpu(), logits.to("cpu", dtype).contiguous()
    finally:
        model.train(was_training)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


__all__ = ["DistillSection", "Objectives", "TeacherFile", "distill_loss", "save_teacher_logits"]
