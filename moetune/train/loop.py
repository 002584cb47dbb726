"""The training loop: one for every run, stepping a list of jobs (:mod:`.jobs`; one adapter = one job).

A step takes ``grad_accum`` micro-batches from every job that still has steps to do. With one job a
micro-batch goes to the model as it is (its active adapters: the trained one over any frozen ones);
with several, the jobs' micro-batches are padded into one batch and each sample runs through its own
adapter (``adapter_names``). :class:`~.losses.StepLoss` turns each forward into the loss to
backpropagate (weighted by counted tokens, so accumulation equals one large batch), which the fp16
loss scaler scales (``model.dtype: fp16``; a no-op otherwise). Then per job: gradients are summed
over ranks (:class:`~.parallel.Parallel`), unscaled, clipped, and checked: a step whose loss or
gradient norm is not finite on any rank is skipped (and the loss scale backs off); otherwise the
optimizer steps and AdaLoRA reallocates; the schedule steps either way. DeepSeek-V3 router-bias
balancing runs once per step on the routed counts of every micro-batch, unless a job skipped. Then
evaluation, metrics and checkpoints (:mod:`.state`); a job that reaches its ``max_steps`` writes its
adapter folder and drops out, the others go on. SIGINT/SIGTERM end the run after the step in
progress, with a checkpoint of it (:mod:`moetune.signals`).

Adapters trained together equal each trained alone on the same data order (float rounding aside)
as long as nothing random differs: dropout 0 and no router jitter (dropout masks are drawn for the
whole mixed batch). Router balancing moves base-model biases that every job shares: the one thing
that makes adapters trained together differ from each alone.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import TrainConfig
from ..outputs import OwnedFolder
from ..peft.core.layer import set_active_adapters
from ..peft.formats.adapters import save_adapter
from ..signals import StopRequest
from .checkpoint import save_checkpoint
from .evaluate import Evaluator
from .jobs import Job, build_jobs, check_supported
from .losses import StepLoss
from .preference import preference_objective, step_loss
from .metrics import MetricsLog, Progress, open_metrics, router_metrics
from .objectives import Objectives
from .parallel import Parallel
from .plot import plot_metrics
from .results import TrainResult, job_mixture, losses_of, peak_memory_gib, step_record
from .run_folder import adapter_target, open_run_folder, plan_run_folder
from .setup import RunParts
from .state import restore_run, router_biases, run_state

log = logging.getLogger(__name__)


class Trainer:
    """One run of ``config``: its jobs on one process or, with ``parallel``, as one rank of a
    data-parallel run (one trained adapter only; see :mod:`.distributed`)."""

    def __init__(
        self,
        config: TrainConfig,
        parts: RunParts,
        *,
        folder: OwnedFolder | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        self.config, self.parts = config, parts
        self.parallel = parallel or Parallel()
        check_supported(config, self.parallel.world_size)
        self.folder = folder or open_run_folder(plan_run_folder(config, resume=None))  # built directly: a new run
        self.parallel.prepare(parts)  # shards the model (fsdp) before the optimizers see it
        self.model, self.device = parts.model, parts.device
        self.out = Path(config.checkpoint.output_dir)
        self.together = sum(not a.frozen for a in config.adapters) > 1  # each sample through its own adapter
        if not self.together:
            set_active_adapters(self.model, [a.name for a in config.adapters])
        self.jobs: list[Job] = build_jobs(config, parts, self.parallel)
        self.step, self.tokens, self.start = 0, 0, time.perf_counter()
        self.saved_step, self.saved_path = 0, None  # the newest checkpoint of this run
        self.objectives = Objectives(config, self.model)  # AdaLoRA, distillation; no-ops when not configured
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=parts.dtype == torch.float16)
        self.last: dict | None = None
        self.eval_loss: float | None = None
        self.preference = preference_objective(self)  # None unless optim.objective is a preference objective
        self.evaluator = Evaluator(
            self.model,
            self.parallel,
            self.device,
            self.autocast,
            parts.tokenizer.pad_id,
            self.together,
            self.preference,
        )
        self.means: list[float] = []

    @property
    def params(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """Every adapter's parameters, by adapter name."""
        return {n: ps for j in self.jobs for n, ps in j.params.items()}

    # --- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        state = run_state(self)  # every rank takes part in gathering it; rank 0 writes it
        path = self.out / "checkpoints" / f"checkpoint-{state.step:08d}"
        if self.parallel.is_main:
            keep = self.config.checkpoint.keep_last
            path = save_checkpoint(self.folder.entry("checkpoints"), state, keep_last=keep, run_id=self.folder.run_id)
        self.parallel.barrier()
        self.saved_step, self.saved_path = self.step, path
        return path

    # --- one step ----------------------------------------------------------------------------
    def autocast(self):
        use = self.device.type == "cuda" and self.parts.dtype != torch.float32
        return torch.autocast("cuda", dtype=self.parts.dtype, enabled=use)

    def train_step(self, jobs: list[Job]) -> dict:
        """One optimizer step of every job in ``jobs`` over ``grad_accum`` micro-batches each;
        returns the step's metrics record."""
        t0 = time.perf_counter()
        micro = [[j.next_batch() for j in jobs] for _ in range(self.config.optim.grad_accum)]
        loss = step_loss(
            [j.name for j in jobs],
            micro,
            preference=self.preference,
            model=self.model,
            parallel=self.parallel,
            objectives=self.objectives,
            aux_loss_coef=self.config.optim.aux_loss_coef,
            together=self.together,
            pad_id=self.parts.tokenizer.pad_id,
        )
        for i, parts in enumerate(micro):
            self._micro_step(loss, i, parts, last=i == len(micro) - 1)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        per_job = {j.name: self._update(j, loss.totals(j.name)) for j in jobs}
        self.scaler.update()  # backs off after an overflow (fp16)
        if not any(r["skipped"] for r in per_job.values()):
            self._balance_routers(loss.counts)
        if self.together:
            for j in jobs:
                per_job[j.name].update(job_mixture(self.model, loss.records, j.name))
        self.step += 1
        record = step_record(
            self.step,
            per_job,
            together=self.together,
            model=self.model,
            records=loss.records,
            router=router_metrics(self.parallel.router_stats(loss.stats)),
            seconds=time.perf_counter() - t0,
            elapsed=time.perf_counter() - self.start,
        )
        return record if scale is None else {**record, "loss_scale": scale}

    def _micro_step(self, loss: StepLoss, index: int, parts: list[dict], *, last: bool) -> None:
        """Forward and backward of one micro-batch (every job's part of it)."""
        self.parallel.gradient_sync(last)
        self.scaler.scale(loss.micro(index, parts, device=self.device, autocast=self.autocast)).backward()

    def _update(self, job: Job, totals: dict) -> dict:
        """Sync, unscale, clip, then step (unless the loss or gradient norm is not finite) and schedule ``job``."""
        par, params = self.parallel, job.trainable
        par.sync_grads(params)  # before unscaling: every rank sees the same overflow
        for opt in job.optimizers.values():
            self.scaler.unscale_(opt)
        norm = par.clip_grad_norm(params, job.optim.max_grad_norm or float("inf"))
        finite = par.all_ok(math.isfinite(totals["loss"]) and bool(torch.isfinite(norm)))
        if finite:
            for opt in job.optimizers.values():
                opt.step()
            self.objectives.after_step(self.model, job.step + 1)  # AdaLoRA: needs the gradients, before zero_grad
        else:
            job.skipped += 1
        for opt in job.optimizers.values():
            opt.zero_grad(set_to_none=True)
        lr = next(iter(job.schedulers.values())).get_last_lr()[0]
        for s in job.schedulers.values():
            s.step()
        job.step += 1
        return {**totals, "step": job.step, "grad_norm": float(norm), "lr": lr, "skipped": not finite}

    @torch.no_grad()
    def _balance_routers(self, counts: list) -> None:
        """Aux-loss-free router balancing (routers with a correction bias: DeepSeek-V3) on the step's
        routed-token counts (all jobs, all ranks)."""
        speed = self.config.optim.router_bias_update_speed
        if speed and counts:
            self.model.update_router_biases(self.parallel.router_stats(counts), speed)

    # --- the run -----------------------------------------------------------------------------
    def run(self, *, resume: Path | None = None) -> TrainResult:
        if resume is not None:
            restore_run(self, resume)
            self.saved_step, self.saved_path = self.step, resume
            log.info("resumed from %s at step %d", resume, self.step)
        cfg, main = self.config, self.parallel.is_main
        metrics = open_metrics(self.folder, main=main, resume_step=self.step if resume else None, cfg=cfg.logging)
        progress = Progress(
            total=max(j.optim.max_steps for j in self.jobs), initial=self.step, enabled=cfg.logging.progress and main
        )
        for j in self.jobs:
            j.batches = j.loader.iter_from(j.state)
        self.model.train()
        self.start = time.perf_counter()
        with StopRequest() as stop:
            while active := [j for j in self.jobs if not j.done]:
                self._loop_step(active, metrics, progress)
                # every rank stops after the same step; a signal during the last one lets the run finish
                if not self.parallel.all_ok(not stop.requested) and any(not j.done for j in self.jobs):
                    self._stop(stop, metrics, progress)
        progress.close()
        every = cfg.logging.eval_every
        if not self.together and not (every and self.step % every == 0):  # one job: a last evaluation of its own
            self.eval_loss = self.evaluator.loss(self.jobs[0])
            if self.eval_loss is not None:
                metrics.write({"step": self.step, "eval_loss": self.eval_loss, **self.evaluator.extra})
        return self._finish(metrics)

    def _loop_step(self, active: list[Job], metrics: MetricsLog, progress: Progress) -> None:
        """One step of :meth:`run` with its logging, evaluation, finished adapters and checkpoint."""
        cfg = self.config
        record = self.train_step(active)
        self.tokens += record["tokens"]
        for name, r in record["adapters"].items() if self.together else [("", record)]:
            if r["skipped"] and self.parallel.is_main:
                where = f"adapter '{name}': " if name else ""
                progress.write(f"step {self.step}: {where}non-finite loss or gradient norm; update skipped")
        ran = self.evaluator.due(active, record, self.config.logging.eval_every)
        if ran and not self.together:
            self.eval_loss = next(iter(ran.values()))
        for j in active:
            if j.done:  # this adapter is finished: write it now, the others go on
                self._save_job(j)
        if self.step % cfg.logging.log_every == 0 or all(j.done for j in self.jobs):
            metrics.write(record)
        progress.update(record)
        self.last, self.means = record, self.means + [record["loss"]]
        if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
            self.save()

    def _save_job(self, job: Job) -> None:
        """Write ``job``'s adapter folder(s) (rank 0; every rank gathers sharded adapters)."""
        dirs = dict(job.out_dirs)
        with self.parallel.full_adapters(self.model):
            if self.parallel.is_main:  # only rank 0 records entries in the run folder (others may still be stepping)
                dirs = {n: save_adapter(self.model, adapter_target(self.folder, d), name=n) for n, d in dirs.items()}
                self.objectives.finish(self.model, dirs)
        job.saved = {n: Path(d) for n, d in dirs.items()}

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
        raise stop.exception(
            f"stopped after step {self.step}; {where}" + ("; continue with --resume" if self.saved_path else "")
        )

    def _finish(self, metrics: MetricsLog) -> TrainResult:
        for j in self.jobs:
            if j.saved is None:  # finished before the checkpoint this run resumed from
                self._save_job(j)
        if self.config.optim.router_bias_update_speed and self.parallel.is_main:
            save_file(
                {n: b.float().cpu().contiguous() for n, b in router_biases(self.model).items()},
                str(self.folder.entry("router_biases.safetensors")),
            )
        records = metrics.read()
        metrics.close()
        names = [j.name for j in self.jobs]
        series = losses_of(records, names, together=self.together)
        plot = (
            plot_metrics(records, self.folder.entry("loss.png"), title=self.out.name)
            if any(series.values()) and self.parallel.is_main
            else None
        )
        self.parallel.barrier()
        evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
        return TrainResult(
            output_dir=self.out,
            adapter_dirs={n: p for j in self.jobs for n, p in (j.saved or {}).items()},
            steps=self.step,
            tokens=self.tokens,
            seconds=time.perf_counter() - self.start,
            peak_memory_gib=peak_memory_gib(self.device),
            final_loss=self.last["loss"] if self.last else None,
            eval_loss=(evals[-1] if evals else None) if self.together else self.eval_loss,
            skipped_steps=sum(j.skipped for j in self.jobs),
            plot=plot,
            losses=self.means if self.together else series[names[0]],
            objective=self.config.optim.objective,
        )
