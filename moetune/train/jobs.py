"""A run is a list of jobs: one trained adapter = one job.

A :class:`Job` has its own data, batch order, optimizer(s), schedule, step count and output folder(s).
A run that trains one adapter is one job, which also carries the run's frozen adapters (they stack
under it in every forward, are checkpointed and written with it). A run that trains several adapters
at once has one job per adapter; each sample of a mixed batch goes through its own adapter only, so
the jobs train as each would alone (see :mod:`.loop`).

What the loop cannot do is refused here, before anything is built (:func:`check_supported`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..config import OptimSection, TrainConfig
from ..data import DataSplits, SamplerState, build_datasets, make_train_loader
from ..data.preference import build_preference_datasets, make_preference_loader
from ..errors import ConfigError
from ..peft.core.params import AdapterParams, adapter_parameters
from .optim import optimizer_for, scheduler_for

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "segment_ids")
PAD = {"attention_mask": 0, "labels": -100, "position_ids": 0, "segment_ids": 0}


@dataclass
class Job:
    """One trained adapter: its data, order, optimizers, schedules, progress and output folders.

    ``params``, ``optimizers``, ``schedulers`` and ``out_dirs`` are keyed by adapter name: the trained
    adapter, plus the run's frozen adapters in a one-job run.
    """

    name: str
    optim: OptimSection
    data: DataSplits
    loader: object
    params: dict[str, AdapterParams]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    out_dirs: dict[str, Path]
    state: SamplerState = field(default_factory=SamplerState)
    step: int = 0
    skipped: int = 0
    batches: Iterator | None = None
    saved: dict[str, Path] | None = None  # the adapter folders, once written

    @property
    def done(self) -> bool:
        return self.step >= self.optim.max_steps

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        """Every parameter the job's optimizers hold (clipping and the non-finite guard see them together)."""
        return [p for ps in self.params.values() for p in ps.values()]

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch, self.state = next(self.batches)
        return batch


def check_supported(config: TrainConfig, world_size: int) -> None:
    """Refuse what the loop does not support (config-only combinations are refused by the config)."""
    trained = [a.name for a in config.adapters if not a.frozen]
    if len(trained) > 1 and world_size > 1:
        raise ConfigError(
            f"adapters: training several adapters at once ({', '.join(trained)}) runs on one process for now; "
            "start it without torchrun, or train the adapters in separate runs"
        )


def build_jobs(config: TrainConfig, parts, parallel) -> list[Job]:
    """The run's jobs: one per trained adapter; a single trained adapter's job also holds the frozen ones."""
    trained = [i for i, a in enumerate(config.adapters) if not a.frozen]
    if len(trained) == 1:
        return [_job(config, parts, parallel, trained[0], list(range(len(config.adapters))))]
    return [_job(config, parts, parallel, i, [i]) for i in trained]


def _job(config: TrainConfig, parts, parallel, index: int, members: list[int]) -> Job:
    """Job of adapter ``index``, holding adapters ``members`` (indices into ``config.adapters``)."""
    tok, data_cfg, o = parts.tokenizer, config.adapter_data(index), config.adapter_optim(index)
    data = parts.data if data_cfg == config.data else build_run_data(data_cfg, tok, config.seed, o.objective)
    order = {"seed": config.seed + data_cfg.seed, "rank": parallel.rank, "world_size": parallel.world_size}
    if o.objective == "sft":
        loader = make_train_loader(
            data.train,
            batch_size=o.batch_size,
            max_length=data_cfg.max_length,
            packing=data_cfg.packing,
            pad_id=tok.pad_id,
            **order,
        )
    else:
        loader = make_preference_loader(data.train, batch_size=o.batch_size, pad_id=tok.pad_id, **order)
    names = [config.adapters[i].name for i in members]
    params = {n: adapter_parameters(parts.model, n) for n in names}
    optimizers = {n: optimizer_for(p, o) for n, p in params.items()}
    schedulers = {n: scheduler_for(opt, o) for n, opt in optimizers.items()}
    return Job(
        name=config.adapters[index].name,
        optim=o,
        data=data,
        loader=loader,
        params=params,
        optimizers=optimizers,
        schedulers=schedulers,
        out_dirs={config.adapters[i].name: config.adapter_dir(i) for i in members},
    )


def build_run_data(section, tokenizer, seed: int, objective: str) -> DataSplits:
    """The data of a run: supervised rows for ``sft``, else preference pairs or KTO rows."""
    if objective == "sft":
        return build_datasets(section, tokenizer, seed=seed)
    kind = "kto" if objective == "kto" else "pairs"
    return build_preference_datasets(section, tokenizer, kind=kind, seed=seed)


def merge_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack batches of different widths row-wise, right-padding to the widest; a batch without
    ``segment_ids`` (unpacked) gets segment 1 on its real tokens when another one has them.
    A single batch is returned as it is (its known keys)."""
    if len(batches) == 1:
        return {k: batches[0][k] for k in BATCH_KEYS if k in batches[0]}
    width = max(b["input_ids"].shape[1] for b in batches)
    packed = any("segment_ids" in b for b in batches)
    out: dict[str, list[torch.Tensor]] = {}
    for b in batches:
        b = dict(b)
        if packed and "segment_ids" not in b:
            b["segment_ids"] = b["attention_mask"].clone()
        for key in BATCH_KEYS:
            if key in b:
                t = b[key]
                fill = pad_id if key == "input_ids" else PAD[key]
                out.setdefault(key, []).append(torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill))
    return {k: torch.cat(v) for k, v in out.items()}
