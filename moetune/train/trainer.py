"""The training loop: gradient accumulation, clipping, a non-finite guard, eval, checkpoints.

Resume is exact: the checkpoint holds adapter weights, optimizer and scheduler state, every RNG
state, the data position and AdaLoRA's allocator state (importance EMAs, masks), so N steps
straight and N/2 + resume produce bitwise-identical losses and weights on CPU.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import TrainConfig
from ..data import SamplerState, make_train_loader
from ..errors import CheckpointError
from ..outputs import OwnedFolder
from ..model.deepseek import update_correction_biases
from ..model.moe import RouterStats
from ..peft.core.layer import set_active_adapters
from ..peft.formats.adapters import save_adapter
from ..peft.mixtures.stats import adapter_router_loss, mixture_metrics
from ..signals import StopRequest
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .distributed import Parallel, distributed_run
from .metrics import MemoryLog, MetricsLog, Progress, router_metrics
from .objectives import Objectives
from .multi import MultiTrainer
from ..peft.core.params import adapter_parameters
from .optim import build_optimizer, build_scheduler
from .plot import plot_metrics
from .run_folder import adapter_target, open_run_folder, plan_run_folder, resolve_resume, run_view
from .setup import RunParts, prepare_run

log = logging.getLogger(__name__)
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "segment_ids")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dirs: dict[str, Path]
    steps: int
    tokens: int
    seconds: float
    peak_memory_gib: float
    final_loss: float | None
    eval_loss: float | None
    skipped_steps: int
    plot: Path | None
    losses: list[float] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"trained {self.steps} steps, {self.tokens:,} tokens in {self.seconds:.1f}s ({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s), peak memory {self.peak_memory_gib:.2f} GiB",
            f"final train loss {self.final_loss:.4f}" + (f", eval loss {self.eval_loss:.4f} (perplexity {math.exp(min(self.eval_loss, 50)):.2f})" if self.eval_loss is not None else ""),
        ]
        if self.skipped_steps:
            lines.append(f"skipped {self.skipped_steps} step(s) with non-finite loss or gradients")
        lines += [f"adapter '{n}': {p}" for n, p in self.adapter_dirs.items()]
        if self.plot:
            lines.append(f"loss plot: {self.plot}")
        return "\n".join(lines)


def _add_counts(acc: list[RouterStats], stats: list[RouterStats]) -> list[RouterStats]:
    """Per-layer routed-token counts summed over a step's micro-batches."""
    if not acc:
        return [RouterStats(counts=s.counts.detach(), prob_sum=s.prob_sum.detach(), tokens=torch.as_tensor(s.tokens).detach()) for s in stats]
    return [RouterStats(counts=a.counts + s.counts.detach(), prob_sum=a.prob_sum + s.prob_sum.detach(), tokens=a.tokens + torch.as_tensor(s.tokens).detach()) for a, s in zip(acc, stats)]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device) for k in BATCH_KEYS if k in batch}


class Trainer:
    """One run of one configuration (single adapter set) on one process or, with ``parallel``,
    as one rank of a data-parallel run (see :mod:`.distributed`)."""

    def __init__(self, config: TrainConfig, parts: RunParts, *, folder: OwnedFolder | None = None, parallel: Parallel | None = None) -> None:
        self.config, self.parts = config, parts
        self.folder = folder or open_run_folder(plan_run_folder(config, resume=None))  # built directly: a new run
        self.parallel = parallel or Parallel()
        self.parallel.prepare(parts)  # shards the model (fsdp) before the optimizers see it
        self.model, self.device = parts.model, parts.device
        self.out = Path(config.checkpoint.output_dir)
        self.names = [a.name for a in config.adapters]
        set_active_adapters(self.model, self.names)
        self.params = {n: adapter_parameters(self.model, n) for n in self.names}
        o = config.optim
        self.optimizers = {n: build_optimizer(p, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, loraplus_lr_ratio=o.loraplus_lr_ratio) for n, p in self.params.items()}
        self.schedulers = {n: build_scheduler(opt, kind=o.lr_schedule, warmup=o.warmup_steps, total=o.max_steps) for n, opt in self.optimizers.items()}
        self.loader = make_train_loader(parts.data.train, batch_size=o.batch_size, max_length=config.data.max_length, packing=config.data.packing, pad_id=parts.tokenizer.pad_id, seed=config.seed + config.data.seed, rank=self.parallel.rank, world_size=self.parallel.world_size)
        self.step, self.data_state, self.skipped = 0, SamplerState(), 0
        self.saved_step, self.saved_path = 0, None  # the newest checkpoint of this run
        self.objectives = Objectives(config, self.model)  # AdaLoRA, distillation; no-ops when not configured

    # --- state ----------------------------------------------------------------------------
    def state(self) -> TrainState:
        """The run's state, in full tensors whatever the rank count (collective when distributed)."""
        par = self.parallel
        return TrainState(
            step=self.step,
            adapters={n: {k: par.full_tensor(p.detach()) for k, p in ps.items()} for n, ps in self.params.items()},
            optimizers={n: par.full_optimizer_state(o) for n, o in self.optimizers.items()},
            schedulers={n: s.state_dict() for n, s in self.schedulers.items()},
            data=self.data_state.to_dict(),
            rng=par.rng_state(),
            allocators={n: {k: par.full_tensor(t) for k, t in ts.items()} for n, ts in self.objectives.allocator_state(self.model).items()},
            extra={"skipped": self.skipped, "world_size": par.world_size, "global_batch": self.config.optim.batch_size * par.world_size,
                   "router_biases": {n: b.float().cpu().tolist() for n, b in self.router_biases().items()} if self.config.optim.router_bias_update_speed else {}},
        )

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if sorted(state.adapters) != sorted(self.names):
            raise CheckpointError(f"checkpoint '{path}' holds adapters {sorted(state.adapters)}, the config trains {sorted(self.names)}")
        with torch.no_grad():
            for name, tensors in state.adapters.items():
                for key, p in self.params[name].items():
                    if key not in tensors or tensors[key].shape != p.shape:
                        raise CheckpointError(f"checkpoint '{path}': adapter '{name}' tensor '{key}' is missing or has another shape; was it made with a different config?")
                    self.parallel.load_tensor(p, tensors[key])
        for n in self.names:
            self.parallel.load_optimizer_state(self.optimizers[n], state.optimizers[n])
            self.schedulers[n].load_state_dict(state.schedulers[n])
        self.parallel.set_rng_state(state.rng, seed=self.config.seed, step=state.step)
        self.step, self.data_state = state.step, SamplerState.from_dict(state.data)
        self.skipped = state.extra.get("skipped", 0)
        self.objectives.load_allocator_state(self.model, state.allocators, where=str(path), copy=self.parallel.load_tensor)
        biases = self.router_biases()
        with torch.no_grad():
            for name, values in state.extra.get("router_biases", {}).items():
                biases[name].copy_(torch.tensor(values, dtype=torch.float32))
        saved, now = state.extra.get("global_batch"), self.config.optim.batch_size * self.parallel.world_size
        if saved is not None and saved != now:
            log.warning("checkpoint '%s' was trained with a global batch of %d rows, this run has %d (batch_size x ranks); the data position carries over, the loss sequence will not match", path, saved, now)

    def save(self) -> Path:
        state = self.state()  # every rank takes part in gathering it; rank 0 writes it
        path = self.out / "checkpoints" / f"checkpoint-{state.step:08d}"
        if self.parallel.is_main:
            path = save_checkpoint(self.folder.entry("checkpoints"), state, keep_last=self.config.checkpoint.keep_last, run_id=self.folder.run_id)
        self.parallel.barrier()
        self.saved_step, self.saved_path = self.step, path
        return path

    # --- steps ----------------------------------------------------------------------------
    def _autocast(self):
        use = self.device.type == "cuda" and self.parts.dtype != torch.float32
        return torch.autocast("cuda", dtype=self.parts.dtype, enabled=use)

    def train_step(self, batches) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches. Each micro-batch's mean loss (and
        distillation term) is weighted by its share of the step's counted tokens, over every rank
        when distributed (see :mod:`.distributed`), so the step's loss and gradient are those of
        one batch holding all of its rows. Router aux losses are per micro-batch, averaged."""
        o, par = self.config.optim, self.parallel
        loss_sum, aux_sum, router_sum, tokens, stats, step_counts = 0.0, 0.0, 0.0, 0, [], []
        batches = list(batches)
        weights = par.micro_weights([b for b, _ in batches])
        for i, ((batch, self.data_state), weight) in enumerate(zip(batches, weights)):
            batch = _to_device(batch, self.device)
            par.gradient_sync(i == len(batches) - 1)
            with self._autocast():
                out = self.model(**batch, **self.objectives.forward_kwargs)
                extra = self.objectives.loss(self.model, batch, out)
            ce = out.loss * weight
            loss = ce if extra is None else ce + extra * weight
            if out.aux_loss is not None and o.aux_loss_coef:
                aux = par.aux_loss(out, self.model.args.moe.num_experts) / o.grad_accum
                loss = loss + o.aux_loss_coef * aux
                aux_sum += aux.item()
            router = adapter_router_loss(out.records)  # mixtures of LoRA experts: their own router losses
            if router is not None:
                router = router / o.grad_accum
                loss = loss + router
                router_sum += router.item()
            loss.backward()
            loss_sum += ce.item()
            tokens += int(batch["attention_mask"].sum())
            stats, records = out.router_stats, out.records
            step_counts = _add_counts(step_counts, stats)
        loss_sum, aux_sum, tokens = par.sum_floats(loss_sum, aux_sum, tokens)
        params = [p for ps in self.params.values() for p in ps.values()]
        par.sync_grads(params)
        norm = par.clip_grad_norm(params, o.max_grad_norm or float("inf"))
        finite = par.all_ok(math.isfinite(loss_sum) and bool(torch.isfinite(norm)))
        if finite:
            for opt in self.optimizers.values():
                opt.step()
            self.objectives.after_step(self.model, self.step + 1)  # AdaLoRA: needs the gradients, before zero_grad
            self._balance_routers(step_counts)
        else:
            self.skipped += 1
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        lr = next(iter(self.schedulers.values())).get_last_lr()[0]
        for s in self.schedulers.values():
            s.step()
        return {"loss": loss_sum, "aux_loss": aux_sum, "grad_norm": float(norm), "lr": lr, "tokens": int(tokens), "skipped": not finite, **router_metrics(par.router_stats(stats)), **_mixture_record(self.model, records, router_sum)}

    @torch.no_grad()
    def _balance_routers(self, counts: list[RouterStats]) -> None:
        """DeepSeek-V3 aux-loss-free balancing on the step's routed-token counts (all ranks)."""
        speed = self.config.optim.router_bias_update_speed
        if speed and counts:
            update_correction_biases(self.model, self.parallel.router_stats(counts), speed)

    def router_biases(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if n.endswith("e_score_correction_bias")}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        examples = self.parts.data.eval
        if not examples:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch, counts in self.parallel.eval_batches(examples, batch_size=self.config.optim.batch_size, pad_id=self.parts.tokenizer.pad_id):
            batch = _to_device(batch, self.device)
            n = int((batch["labels"][:, 1:] != -100).sum()) if counts else 0
            with self._autocast():
                total += self.model(**batch).loss.item() * n
            count += n
        total, count = self.parallel.sum_floats(total, count)
        self.model.train()
        return total / max(count, 1)

    def run(self, *, resume: Path | None = None) -> TrainResult:
        if resume is not None:
            self.restore(resume)
            self.saved_step, self.saved_path = self.step, resume
            log.info("resumed from %s at step %d", resume, self.step)
        cfg, o, main = self.config, self.config.optim, self.parallel.is_main
        if main:
            metrics = MetricsLog(self.folder.entry("metrics.jsonl"), resume_step=self.step if resume else None, tensorboard_dir=self.folder.entry("tensorboard") if cfg.logging.tensorboard else None)
        else:
            metrics = MemoryLog()
        progress = Progress(total=o.max_steps, initial=self.step, enabled=cfg.logging.progress and main)
        batches = self.loader.iter_from(self.data_state)
        self.model.train()
        start, tokens, eval_loss, last = time.perf_counter(), 0, None, None
        with StopRequest() as stop:
            while self.step < o.max_steps:
                tokens, last, eval_loss = self._loop_step(batches, metrics, progress, start, tokens, last, eval_loss)
                # every rank stops after the same step; a signal during the last one lets the run finish
                if not self.parallel.all_ok(not stop.requested) and self.step < o.max_steps:
                    self._stop(stop, metrics, progress)
        progress.close()
        if not (cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0):
            eval_loss = self.evaluate()
            if eval_loss is not None:
                metrics.write({"step": self.step, "eval_loss": eval_loss})
        return self._finish(metrics, start, tokens, last, eval_loss)

    def _loop_step(self, batches, metrics, progress: Progress, start: float, tokens: int, last: dict | None, eval_loss: float | None):
        """One step of :meth:`run` with its logging, evaluation and checkpoint."""
        cfg, o = self.config, self.config.optim
        t0 = time.perf_counter()
        record = self.train_step([next(batches) for _ in range(o.grad_accum)])
        self.step += 1
        tokens += record["tokens"]
        record = {"step": self.step, **record, "tokens_per_s": record["tokens"] / max(time.perf_counter() - t0, 1e-9), "elapsed_s": round(time.perf_counter() - start, 3)}
        if record["skipped"] and self.parallel.is_main:
            progress.write(f"step {self.step}: non-finite loss or gradient norm; update skipped")
        if cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0:
            eval_loss = record["eval_loss"] = self.evaluate()
        if self.step % cfg.logging.log_every == 0 or self.step == o.max_steps:
            metrics.write(record)
        progress.update(record)
        if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
            self.save()
        return tokens, record, eval_loss

    def _stop(self, stop: StopRequest, metrics, progress: Progress) -> None:
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

    def _finish(self, metrics: MetricsLog, start: float, tokens: int, last: dict | None, eval_loss: float | None) -> TrainResult:
        dirs = {a.name: adapter_target(self.folder, self.config.adapter_dir(i)) for i, a in enumerate(self.config.adapters)}
        with self.parallel.full_adapters(self.model):  # gathers sharded adapters on every rank
            if self.parallel.is_main:
                dirs = {n: save_adapter(self.model, d, name=n) for n, d in dirs.items()}
                self.objectives.finish(self.model, dirs)
                if self.config.optim.router_bias_update_speed:
                    save_file({n: b.float().cpu().contiguous() for n, b in self.router_biases().items()}, str(self.folder.entry("router_biases.safetensors")))
        records = metrics.read()
        metrics.close()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
        evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        plot = plot_metrics(records, self.folder.entry("loss.png"), title=self.out.name) if train and self.parallel.is_main else None
        self.parallel.barrier()
        return TrainResult(
            output_dir=self.out,
            adapter_dirs={n: Path(p) for n, p in dirs.items()},
            steps=self.step,
            tokens=tokens,
            seconds=time.perf_counter() - start,
            peak_memory_gib=peak_memory_gib(self.device),
            final_loss=last["loss"] if last else None,
            eval_loss=eval_loss,
            skipped_steps=self.skipped,
            plot=plot,
            losses=[l for _, l in train],
        )


def _mixture_record(model, records: dict, router_loss: float) -> dict:
    """Router loss and per-router load/entropy of mixture adapters, for metrics.jsonl."""
    metrics = mixture_metrics(model, records)
    return {"router_loss": router_loss, "mixture": metrics} if metrics else {}


def train(config: TrainConfig, *, resume: str | bool | None = None, overwrite: bool = False, model=None, tokenizer=None) -> TrainResult:
    """Run training as configured; returns where things went and what happened.

    ``checkpoint.output_dir`` must be new or empty, or hold this run (``resume``: continue from its
    latest checkpoint, or from the checkpoint folder ``resume`` names), or ``overwrite``: start over,
    deleting only what the earlier run wrote there (see :mod:`.run_folder`). That and the optional
    dependencies are checked before anything is loaded or written.

    Started by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set), this process joins the process group
    and trains as one rank of a data-parallel run (see :mod:`.distributed`).
    """
    config = config.single_adapter_view()  # one adapter: its own data/optim keys are the run's
    plan = plan_run_folder(config, resume=resume, overwrite=overwrite)
    checkpoint = resolve_resume(config, resume, plan.run_id)
    with distributed_run(config) as (config, parallel):
        parts = prepare_run(config, model=model, tokenizer=tokenizer)
        parallel.barrier()  # every rank has checked the folder (plan) before rank 0 changes it
        folder = open_run_folder(plan) if parallel.is_main else run_view(plan)
        parallel.barrier()
        together = sum(not a.frozen for a in config.adapters) > 1  # each sample through its own adapter
        trainer = (MultiTrainer if together else Trainer)(config, parts, folder=folder, parallel=parallel)
        return trainer.run(resume=checkpoint)
