"""Multiple-choice evaluation by log-likelihood (``moetune eval --task FILE.jsonl``), and the
router statistics shown by ``moetune eval``.

A task file is JSONL, one question per line (ARC / BoolQ / PIQA / HellaSwag style)::

    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "answer": 1}

``choices`` is a list of strings, or ARC's ``{"text": [...], "label": ["A", "B", ...]}``;
``answer`` is a 0-based index, a letter (``"B"``) or one of the labels. Each choice is scored
as the log-likelihood of its tokens after the question (``question + " " + choice``, or with
``chat`` the question formatted as training formats an instruction - the chat template's user turn,
else ``### Instruction:`` ... ``### Response:`` - and the choice as the reply), in one batched forward per
``batch_size`` (question, choice) pairs. Two accuracies are reported:

- ``accuracy``: the choice with the highest summed log-likelihood;
- ``accuracy_norm`` (the headline): the highest log-likelihood per UTF-8 byte of the choice
  (lm-evaluation-harness's ``acc_norm``), which does not favour short answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.collate import Collator
from .data.examples import IGNORE, Example, instruction_prompt
from .errors import DataError
from .model.loss import counted_tokens, sample_losses
from .peft.mixtures.stats import format_metrics, mean_metrics, merge_metrics, mixture_metrics


@dataclass
class Question:
    text: str
    choices: list[str]
    answer: int


@dataclass
class TaskResult:
    """Accuracy on one task file."""

    file: str
    questions: int
    accuracy: float
    accuracy_norm: float
    router: str = ""

    def summary(self) -> str:
        line = (
            f"{Path(self.file).name}: accuracy_norm {self.accuracy_norm:.4f} (headline, log-likelihood per byte)  "
            f"accuracy {self.accuracy:.4f} (summed log-likelihood)  {self.questions} questions"
        )
        return line + ("\n" + self.router if self.router else "")


def _answer(raw, labels: list[str], n: int, where: str) -> int:
    if isinstance(raw, bool):
        raw = int(raw)  # BoolQ: true/false against choices ["no", "yes"]
    if isinstance(raw, int) and 0 <= raw < n:
        return raw
    if isinstance(raw, str):
        if raw in labels:
            return labels.index(raw)
        if len(raw) == 1 and raw.isalpha() and ord(raw.upper()) - ord("A") < n:
            return ord(raw.upper()) - ord("A")
        if raw.isdigit() and int(raw) < n:
            return int(raw)
    raise DataError(f"{where}: answer {raw!r} is not a choice index (0..{n - 1}), a letter or a label {labels}")


def read_task(path: str | Path) -> list[Question]:
    """Parse a task file; errors name the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{where}: expected an object with a 'question' string, 'choices' and 'answer'")
        choices, labels = row.get("choices"), []
        if isinstance(choices, dict):
            labels, choices = list(choices.get("label") or []), choices.get("text")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings (or {{text, label}})")
        if "answer" not in row:
            raise DataError(f"{where}: missing 'answer'")
        out.append(Question(row["question"], choices, _answer(row["answer"], labels, len(choices), where)))
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def _pair(tok, question: str, choice: str, chat: bool, max_length: int) -> Example:
    if chat:
        context, cont = instruction_prompt(tok, question), tok.encode(choice)
    else:
        bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
        context = bos + tok.encode(question)
        cont = tok.encode(choice if question.endswith((" ", "\n")) else " " + choice)
    ids = (context + cont)[-max_length:]  # keep the choice; cut the question's start if needed
    labels = [IGNORE] * (len(ids) - len(cont)) + cont
    return Example(input_ids=ids, labels=labels)


@dataclass
class RouterTally:
    """Router statistics summed over eval batches: base MoE layers and adapter mixtures."""

    base: list[list[float]] = field(default_factory=list)
    mixtures: dict = field(default_factory=dict)

    def add(self, model, out, weight: float) -> None:
        for i, s in enumerate(out.router_stats):
            counts = s.counts.detach().float().cpu()
            if i == len(self.base):
                self.base.append(torch.zeros_like(counts))
            self.base[i] = self.base[i] + counts
        merge_metrics(self.mixtures, mixture_metrics(model, out.records), weight)

    def summary(self) -> str:
        lines = []
        if self.base:
            loads = [(c / c.sum().clamp_min(1)) for c in self.base]
            lines.append(
                "base MoE routers: max expert load vs uniform per layer "
                + " ".join(f"{float(l.max()) * l.numel():.2f}" for l in loads)
            )
        if self.mixtures:
            lines.append(format_metrics(mean_metrics(self.mixtures)))
        return "\n".join(lines)


@torch.no_grad()
def score_task(
    model,
    tok,
    questions: list[Question],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    chat: bool = False,
    adapter: str | None = None,
    tally: RouterTally | None = None,
) -> tuple[float, float]:
    """(accuracy, accuracy_norm) of ``model`` (with adapter ``adapter`` on every sample, or its
    active adapters) on ``questions``."""
    pairs = [(q, c) for q in questions for c in q.choices]
    examples = [_pair(tok, q.text, c, chat, max_length) for q, c in pairs]
    collate = Collator(pad_id=tok.pad_id if tok.pad_id is not None else 0)
    loglik: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate([[e] for e in examples[start : start + batch_size]]).items()}
        names = [adapter] * batch["input_ids"].shape[0] if adapter else None
        out = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            position_ids=batch["position_ids"],
            adapter_names=names,
        )
        loglik += (-sample_losses(out.token_loss)).tolist()
        if tally is not None:
            tally.add(model, out, float(counted_tokens(batch)))
    right = right_norm = 0
    i = 0
    for q in questions:
        scores = loglik[i : i + len(q.choices)]
        norm = [s / max(len(c.encode("utf-8")), 1) for s, c in zip(scores, q.choices)]
        right += int(max(range(len(scores)), key=scores.__getitem__) == q.answer)
        right_norm += int(max(range(len(norm)), key=norm.__getitem__) == q.answer)
        i += len(q.choices)
    return right / len(questions), right_norm / len(questions)


def evaluate_tasks(model, tok, files: list[str], **kw) -> list[TaskResult]:
    """One :class:`TaskResult` per task file (router statistics included)."""
    results = []
    for file in files:
        tally = RouterTally()
        questions = read_task(file)
        acc, acc_norm = score_task(model, tok, questions, tally=tally, **kw)
        results.append(
            TaskResult(
                file=str(file), questions=len(questions), accuracy=acc, accuracy_norm=acc_norm, router=tally.summary()
            )
        )
    return results
