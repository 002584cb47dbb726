"""Several adapters trained at once on one frozen base, in the same forward passes.

Each adapter is a :class:`Job` with its own data, batch order, optimizer, schedule, step count,
checkpoint state and output folder. A step takes one micro-batch from every job that still has
steps to do, pads them into one batch and runs one forward with ``adapter_names`` (one per
sample), so every sample goes through its own adapter only (the adapter layers select their rows).
The loss of a job is the mean over its own counted tokens of the step, all micro-batches together
(so ``grad_accum`` micro-batches equal one batch of all their rows; plus its own router losses), and the
backward of the sum of the jobs' losses gives each adapter exactly its own gradient, because an
adapter's parameters touch only its own samples. Clipping, the non-finite guard, the optimizer
and the scheduler then run per job. A job that reaches its ``max_steps`` writes its adapter and
drops out; the others go on.

So adapters trained together equal each trained alone on the same data order (float rounding
aside) as long as nothing random differs: with dropout 0 and no router jitter. (Dropout masks
are drawn for the whole mixed batch, so with dropout > 0 the runs are statistically, not
bitwise, the same.) Each adapter is initialised from ``seed`` exactly as when trained alone.
DeepSeek-V3 router balancing (``optim.router_bias_update_speed``) moves base-model biases that
all adapters share: on the routed counts of the whole mixed batch, once per step (so it is the
one thing that makes adapters trained together differ from each alone).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ..config import OptimSection, TrainConfig
from ..data import DataSplits, SamplerState, build_datasets, eval_batches, make_train_loader
from ..errors import CheckpointError, ConfigError
from ..outputs import OwnedFolder
from ..model.deepseek import update_correction_biases
from ..model.moe import RouterStats, load_balancing_loss
from ..peft.formats.adapters import save_adapter
from ..peft.mixtures.stats import adapter_router_loss, mixture_metrics
from ..signals import StopRequest
from .checkpoint import TrainState, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import counted_tokens
from .metrics import MetricsLog, Progress
from ..peft.core.params import adapter_parameters
from .optim import build_optimizer, build_scheduler
from .plot import plot_metrics
from .run_folder import adapter_target, open_run_folder, plan_run_folder
from .setup import RunParts

log = logging.getLogger(__name__)
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "segment_ids")
PAD = {"attention_mask": 0, "labels": -100, "position_ids": 0, "segment_ids": 0}


@dataclass
class Job:
    """One adapter's training: its data, order, optimizer, schedule and progress."""

    name: str
    optim: OptimSection
    data: DataSplits
    loader: object
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out_dir: Path
    state: SamplerState = field(default_factory=SamplerState)
    step: int = 0
    skipped: int = 0
    batches: Iterator | None = None
    saved: Path | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.optim.max_steps


def merge_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack batches of different widths row-wise, right-padding to the widest; a batch without
    ``segment_ids`` (unpacked) gets segment 1 on its real tokens when another one has them."""
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


class MultiTrainer:
    """Trains every adapter of ``config`` at once (one process)."""

    def __init__(self, config: TrainConfig, parts: RunParts, *, folder: OwnedFolder | None = None, parallel=None) -> None:
        if parallel is not None and parallel.world_size > 1:
            raise ConfigError("adapters: training several adapters at once runs on one process for now; "
                              "start it without torchrun, or train the adapters in separate runs")
        frozen = [a.name for a in config.adapters if a.frozen]
        if frozen:
            raise ConfigError(f"adapters: frozen adapters {frozen} stack under one trained adapter, but several adapters "
                              "trained at once each run on their own samples; train one adapter on top of them per run")
        special = [a.name for a in config.adapters if a.adalora is not None]
        if special or config.optim.distill is not None:
            raise ConfigError(f"adapters: AdaLoRA adapters ({', '.join(special) or 'none'}) and optim.distill need the "
                              "single-adapter trainer for now; train them in a run of their own")
        speeds = {config.adapter_optim(i).router_bias_update_speed for i in range(len(config.adapters))}
        if speeds != {config.optim.router_bias_update_speed}:
            raise ConfigError(f"adapters: optim.router_bias_update_speed differs between adapters ({sorted(speeds)}); the router "
                              "biases are base-model state that adapters trained together share: set it once, in the run's optim")
        self.config, self.parts, self.model, self.device = config, parts, parts.model, parts.device
        self.folder = folder or open_run_folder(plan_run_folder(config, resume=None))  # built directly: a new run
        self.out = Path(config.checkpoint.output_dir)
        self.jobs = [self._job(i) for i in range(len(config.adapters))]
        self.step = 0
        self.saved_step, self.saved_path = 0, None  # the newest checkpoint of this run

    def _job(self, index: int) -> Job:
        cfg, tok = self.config, self.parts.tokenizer
        name, data_cfg, o = cfg.adapters[index].name, cfg.adapter_data(index), cfg.adapter_optim(index)
        data = self.parts.data if data_cfg == cfg.data else build_datasets(data_cfg, tok, seed=cfg.seed)
        loader = make_train_loader(data.train, batch_size=o.batch_size, max_length=data_cfg.max_length, packing=data_cfg.packing,
                                   pad_id=tok.pad_id, seed=cfg.seed + data_cfg.seed)  # as the same adapter alone
        params = adapter_parameters(self.model, name)
        opt = build_optimizer(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, loraplus_lr_ratio=o.loraplus_lr_ratio)
        sched = build_scheduler(opt, kind=o.lr_schedule, warmup=o.warmup_steps, total=o.max_steps)
        return Job(name=name, optim=o, data=data, loader=loader, params=params, optimizer=opt, scheduler=sched,
                   out_dir=cfg.adapter_dir(index))

    # --- state ----------------------------------------------------------------------------
    def state(self) -> TrainState:
        jobs = self.jobs
        return TrainState(step=self.step, adapters={j.name: {k: p.detach() for k, p in j.params.items()} for j in jobs},
                          optimizers={j.name: j.optimizer.state_dict() for j in jobs},
                          schedulers={j.name: j.scheduler.state_dict() for j in jobs},
                          data={j.name: j.state.to_dict() for j in jobs}, rng=rng_state(),
                          extra={"multi": True, "steps": {j.name: j.step for j in jobs}, "skipped": {j.name: j.skipped for j in jobs},
                                 "router_biases": {n: b.float().cpu().tolist() for n, b in self.router_biases().items()} if self.config.optim.router_bias_update_speed else {}})

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        names = [j.name for j in self.jobs]
        if sorted(state.adapters) != sorted(names) or not state.extra.get("multi"):
            raise CheckpointError(f"checkpoint '{path}' holds adapters {sorted(state.adapters)}, the config trains {sorted(names)} together")
        for j in self.jobs:
            with torch.no_grad():
                for key, p in j.params.items():
                    if key not in state.adapters[j.name] or state.adapters[j.name][key].shape != p.shape:
                        raise CheckpointError(f"checkpoint '{path}': adapter '{j.name}' tensor '{key}' is missing or has another shape")
                    p.copy_(state.adapters[j.name][key])
            j.optimizer.load_state_dict(state.optimizers[j.name])
            j.scheduler.load_state_dict(state.schedulers[j.name])
            j.state = SamplerState.from_dict(state.data[j.name])
            j.step, j.skipped = state.extra["steps"][j.name], state.extra["skipped"][j.name]
        set_rng_state(state.rng)
        self.step = state.step
        biases = self.router_biases()
        with torch.no_grad():
            for name, values in state.extra.get("router_biases", {}).items():
                biases[name].copy_(torch.tensor(values, dtype=torch.float32))

    # --- steps ----------------------------------------------------------------------------
    def train_step(self, jobs: list[Job]) -> dict[str, dict]:
        """One optimizer step of every job in ``jobs``, over ``grad_accum`` mixed micro-batches."""
        accum = self.config.optim.grad_accum
        acc = {j.name: {"loss": 0.0, "aux_loss": 0.0, "router_loss": 0.0, "tokens": 0} for j in jobs}
        micro = [[self._next(j) for j in jobs] for _ in range(accum)]
        counted = {j.name: sum(int(counted_tokens(parts[i])) for parts in micro) for i, j in enumerate(jobs)}
        records: dict = {}
        counts: list[RouterStats] = []
        for parts in micro:
            total, out = self._micro_step(jobs, parts, acc, counted)
            total.backward()
            records, counts = out.records, _add_counts(counts, out.router_stats)
        result = {j.name: {**acc[j.name], **self._update(j, acc[j.name]["loss"]), **_mixture(self.model, records, j.name)} for j in jobs}
        speed = self.config.optim.router_bias_update_speed
        if speed and counts and not any(r["skipped"] for r in result.values()):  # the whole mixed batch's routing, once per step
            with torch.no_grad():
                update_correction_biases(self.model, counts, speed)
        return result

    def router_biases(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if n.endswith("e_score_correction_bias")}

    @staticmethod
    def _next(j: Job) -> dict[str, torch.Tensor]:
        batch, j.state = next(j.batches)
        return batch

    def _micro_step(self, jobs: list[Job], parts: list[dict], acc: dict, counted: dict[str, int]) -> tuple[torch.Tensor, object]:
        """One mixed forward; a job's LM loss is its token sum over its step's counted tokens
        ``counted[name]`` (so accumulation equals one large batch), its router losses are averaged
        over micro-batches."""
        o, accum = self.config.optim, self.config.optim.grad_accum
        batch = {k: v.to(self.device) for k, v in merge_batches(parts, self.parts.tokenizer.pad_id).items()}
        names = [j.name for j, b in zip(jobs, parts) for _ in range(b["input_ids"].shape[0])]
        out = self.model(**batch, adapter_names=names, per_sample=True)
        total, start = 0.0, 0
        for j, b in zip(jobs, parts):
            rows = torch.arange(start, start + b["input_ids"].shape[0], device=self.device)
            start += len(rows)
            loss = ce = out.sample_loss[rows].sum() / max(counted[j.name], 1)
            if out.router_stats and o.aux_loss_coef:
                aux = load_balancing_loss([s.for_samples(rows) for s in out.router_stats], self.model.args.moe.num_experts) / accum
                loss = loss + o.aux_loss_coef * aux
                acc[j.name]["aux_loss"] += aux.item()
            router = adapter_router_loss(out.records, j.name)
            if router is not None:
                router = router / accum
                loss = loss + router
                acc[j.name]["router_loss"] += router.item()
            acc[j.name]["loss"] += ce.item()
            acc[j.name]["tokens"] += int(b["attention_mask"].sum())
            total = total + loss
        return total, out

    def _update(self, j: Job, loss: float) -> dict:
        """Clip, step (unless the loss or the gradient norm is not finite) and schedule one job."""
        params = list(j.params.values())
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.max_grad_norm or float("inf"))
        finite = math.isfinite(loss) and bool(torch.isfinite(norm))
        if finite:
            j.optimizer.step()
        else:
            j.skipped += 1
        j.optimizer.zero_grad(set_to_none=True)
        lr = j.scheduler.get_last_lr()[0]
        j.scheduler.step()
        j.step += 1
        return {"step": j.step, "grad_norm": float(norm), "lr": lr, "skipped": not finite}

    @torch.no_grad()
    def evaluate(self, j: Job) -> float | None:
        if not j.data.eval:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in eval_batches(j.data.eval, batch_size=j.optim.batch_size, pad_id=self.parts.tokenizer.pad_id):
            batch = {k: v.to(self.device) for k, v in batch.items() if k in BATCH_KEYS}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += self.model(**batch, adapter_names=[j.name] * batch["input_ids"].shape[0]).loss.item() * n
            count += n
        self.model.train()
        return total / max(count, 1)

    # --- loop -----------------------------------------------------------------------------
    def run(self, *, resume: Path | None = None):
        from .trainer import TrainResult, peak_memory_gib

        if resume is not None:
            self.restore(resume)
            self.saved_step, self.saved_path = self.step, resume
        cfg = self.config
        metrics = MetricsLog(self.folder.entry("metrics.jsonl"), resume_step=self.step if resume else None,
                             tensorboard_dir=self.folder.entry("tensorboard") if cfg.logging.tensorboard else None)
        total_steps = max(j.optim.max_steps for j in self.jobs)
        progress = Progress(total=total_steps, initial=self.step, enabled=cfg.logging.progress)
        for j in self.jobs:
            j.batches = j.loader.iter_from(j.state)
        self.model.train()
        start, tokens, last, means = time.perf_counter(), 0, None, []
        with StopRequest() as stop:
            while active := [j for j in self.jobs if not j.done]:
                t0 = time.perf_counter()
                per_job = self.train_step(active)
                self.step += 1
                step_tokens = sum(r["tokens"] for r in per_job.values())
                tokens += step_tokens
                mean = sum(r["loss"] for r in per_job.values()) / len(per_job)
                record = {"step": self.step, "loss": mean, "lr": next(iter(per_job.values()))["lr"], "tokens": step_tokens,
                          "tokens_per_s": step_tokens / max(time.perf_counter() - t0, 1e-9),
                          "elapsed_s": round(time.perf_counter() - start, 3), "adapters": per_job}
                self._evaluate_and_finish(active, record)
                if self.step % cfg.logging.log_every == 0 or not any(not j.done for j in self.jobs):
                    metrics.write(record)
                progress.update(record)
                last, means = record, means + [mean]
                if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                    self.save()
                if stop.requested and any(not j.done for j in self.jobs):  # a signal during the last step lets the run finish
                    self._stop(stop, metrics, progress)
        progress.close()
        records = metrics.read()
        metrics.close()
        evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
        series = {j.name: [(r["adapters"][j.name]["step"], r["adapters"][j.name]["loss"]) for r in records
                           if j.name in r.get("adapters", {}) and not r["adapters"][j.name]["skipped"]] for j in self.jobs}
        plot = plot_metrics(records, self.folder.entry("loss.png"), title=self.out.name) if any(series.values()) else None
        if cfg.optim.router_bias_update_speed:
            save_file({n: b.float().cpu().contiguous() for n, b in self.router_biases().items()}, str(self.folder.entry("router_biases.safetensors")))
        return TrainResult(output_dir=self.out, adapter_dirs={j.name: j.saved or self._save(j) for j in self.jobs}, steps=self.step,
                           tokens=tokens, seconds=time.perf_counter() - start, peak_memory_gib=peak_memory_gib(self.device),
                           final_loss=last["loss"] if last else None, eval_loss=evals[-1] if evals else None,
                           skipped_steps=sum(j.skipped for j in self.jobs), plot=plot, losses=means)

    def save(self) -> Path:
        self.saved_path = save_checkpoint(self.folder.entry("checkpoints"), self.state(), keep_last=self.config.checkpoint.keep_last, run_id=self.folder.run_id)
        self.saved_step = self.step
        return self.saved_path

    def _stop(self, stop: StopRequest, metrics: MetricsLog, progress: Progress) -> None:
        """SIGINT/SIGTERM arrived: checkpoint the completed step (``checkpoint.save_on_interrupt``), then raise."""
        progress.close()
        metrics.close()
        if self.saved_step == self.step:
            where = f"checkpoint '{self.saved_path}' holds step {self.step}" if self.saved_path else "no step completed"
        elif self.config.checkpoint.save_on_interrupt:
            where = f"checkpoint '{self.save()}' holds step {self.step}"
        else:
            where = "no checkpoint written (checkpoint.save_on_interrupt is false)"
        raise stop.exception(f"stopped after step {self.step}; {where}" + ("; continue with --resume" if self.saved_path else ""))

    def _evaluate_and_finish(self, active: list[Job], record: dict) -> None:
        every = self.config.logging.eval_every
        evals = []
        for j in active:
            if (every and j.step % every == 0) or j.done:
                loss = self.evaluate(j)
                if loss is not None:
                    record["adapters"][j.name]["eval_loss"] = loss
                    evals.append(loss)
            if j.done:  # this adapter is finished: write it now, the others go on
                j.saved = self._save(j)
        if evals:
            record["eval_loss"] = sum(evals) / len(evals)

    def _save(self, j: Job) -> Path:
        return Path(save_adapter(self.model, adapter_target(self.folder, j.out_dir), name=j.name))


def _add_counts(acc: list[RouterStats], stats: list[RouterStats]) -> list[RouterStats]:
    """Per-layer routed-token counts summed over a step's micro-batches."""
    stats = [RouterStats(counts=s.counts.detach(), prob_sum=s.prob_sum.detach(), tokens=torch.as_tensor(s.tokens).detach()) for s in stats]
    return stats if not acc else [RouterStats(counts=a.counts + s.counts, prob_sum=a.prob_sum + s.prob_sum, tokens=a.tokens + s.tokens) for a, s in zip(acc, stats)]


def _mixture(model, records: dict, name: str) -> dict:
    metrics = mixture_metrics(model, {k: r for k, r in records.items() if getattr(r, "adapter", None) == name})
    return {"mixture": metrics[name]} if name in metrics else {}
