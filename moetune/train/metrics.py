"""What the user sees: metrics.jsonl lines, a progress bar, optional TensorBoard, router stats."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..model.moe import RouterStats


def router_metrics(stats: list[RouterStats]) -> dict[str, list[float]]:
    """Per MoE layer: max expert load relative to uniform (1.0 = balanced), router entropy (nats)."""
    if not stats:
        return {}
    load, entropy = [], []
    for s in stats:
        counts = s.counts.detach().float()
        share = counts / counts.sum().clamp_min(1)
        load.append(round(float(share.max() * counts.numel()), 4))
        p = (s.prob_sum.detach().float() / torch.as_tensor(s.tokens).clamp_min(1)).clamp_min(1e-12)
        p = p / p.sum()
        entropy.append(round(float(-(p * p.log()).sum()), 4))
    return {"router_max_load": load, "router_entropy": entropy}


class MetricsLog:
    """Appends one JSON line per event to ``metrics.jsonl`` (truncated to the resume step)."""

    def __init__(self, path: Path, *, resume_step: int | None = None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        else:
            self._truncate(resume_step)
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.writer = SummaryWriter(str(tensorboard_dir))

    def _truncate(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be redone)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MemoryLog(MetricsLog):
    """A :class:`MetricsLog` that keeps its records in memory (ranks other than 0 write no file)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def read(self) -> list[dict[str, Any]]:
        return list(self.records)


def open_metrics(folder, *, main: bool, resume_step: int | None, cfg) -> MetricsLog:
    """The run's metrics log: ``metrics.jsonl`` (and TensorBoard when ``cfg.tensorboard``) in the run
    folder on rank 0, records in memory on the other ranks."""
    if not main:
        return MemoryLog()
    tensorboard = folder.entry("tensorboard") if cfg.tensorboard else None
    return MetricsLog(folder.entry("metrics.jsonl"), resume_step=resume_step, tensorboard_dir=tensorboard)


class Progress:
    """tqdm bar with step, loss, lr, tokens/s and ETA; silent when disabled."""

    def __init__(self, *, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, leave=True)

    def update(self, record: dict[str, Any]) -> None:
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
        )
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
