"""The loop's state as a checkpoint holds it, and back: exact resume.

A checkpoint (:class:`~moetune.train.checkpoint.TrainState`) holds every adapter's full tensors,
optimizer and scheduler state, every rank's RNG state, the data position, AdaLoRA's allocator state,
DeepSeek-V3 router biases (``optim.router_bias_update_speed``) and the fp16 loss scaler's state, so N
steps straight and N/2 + resume give bitwise-identical losses and weights on CPU.

Two layouts, as before the loops became one: a one-job run keeps its data position and skip count at
the top level (with the rank count and global batch); a run of several jobs keys them by adapter
(``extra.multi``, ``extra.steps``, ``extra.skipped``), and each job resumes at its own step.

The optim settings held in optimizer and scheduler state (lr, LoRA+ ratio, weight decay, betas, eps,
schedule, warmup, max_steps) are recorded too (``extra.optim``); a resume follows the config's, from
the next step on, and says which changed (``--resume optim.max_steps=...`` trains on).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..data import SamplerState
from ..errors import CheckpointError
from .checkpoint import TrainState, load_checkpoint
from .optim import STATE_KEYS, follow_settings, state_settings

log = logging.getLogger(__name__)


def router_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 routers' correction biases (base-model state that router balancing moves)."""
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("e_score_correction_bias")}


def run_state(loop) -> TrainState:
    """``loop``'s state in full tensors whatever the rank count (collective when distributed)."""
    par, jobs = loop.parallel, loop.jobs
    extra = {
        "router_biases": {n: b.float().cpu().tolist() for n, b in router_biases(loop.model).items()}
        if loop.config.optim.router_bias_update_speed
        else {}
    }
    if loop.scaler.is_enabled():
        extra["grad_scaler"] = loop.scaler.state_dict()
    extra["optim"] = {n: state_settings(j.optim) for j in jobs for n in j.optimizers}
    if loop.together:
        data = {j.name: j.state.to_dict() for j in jobs}
        extra.update(multi=True, steps={j.name: j.step for j in jobs}, skipped={j.name: j.skipped for j in jobs})
    else:
        data = jobs[0].state.to_dict()
        extra.update(
            skipped=jobs[0].skipped, world_size=par.world_size, global_batch=jobs[0].optim.batch_size * par.world_size
        )
    return TrainState(
        step=loop.step,
        adapters={
            n: {k: par.full_tensor(p.detach()) for k, p in ps.items()} for j in jobs for n, ps in j.params.items()
        },
        optimizers={n: par.full_optimizer_state(o) for j in jobs for n, o in j.optimizers.items()},
        schedulers={n: s.state_dict() for j in jobs for n, s in j.schedulers.items()},
        data=data,
        rng=par.rng_state(),
        allocators={
            n: {k: par.full_tensor(t) for k, t in ts.items()}
            for n, ts in loop.objectives.allocator_state(loop.model).items()
        },
        extra=extra,
    )


def restore_run(loop, path: Path) -> None:
    """Set ``loop`` to the state of checkpoint ``path``."""
    state = load_checkpoint(path)
    names = sorted(n for j in loop.jobs for n in j.params)
    if sorted(state.adapters) != names or bool(state.extra.get("multi")) != loop.together:
        together = " together" if loop.together else ""
        raise CheckpointError(
            f"checkpoint '{path}' holds adapters {sorted(state.adapters)}, the config trains {names}{together}"
        )
    par = loop.parallel
    for j in loop.jobs:
        _restore_job(j, state, path, par, together=loop.together)
    par.set_rng_state(state.rng, seed=loop.config.seed, step=state.step)
    loop.step = state.step
    loop.objectives.load_allocator_state(loop.model, state.allocators, where=str(path), copy=par.load_tensor)
    biases = router_biases(loop.model)
    with torch.no_grad():
        for name, values in state.extra.get("router_biases", {}).items():
            biases[name].copy_(torch.tensor(values, dtype=torch.float32))
    if loop.scaler.is_enabled() and "grad_scaler" in state.extra:
        loop.scaler.load_state_dict(state.extra["grad_scaler"])
    if not loop.together:
        _warn_global_batch(path, state, loop.jobs[0].optim.batch_size * par.world_size)


def _restore_job(job, state: TrainState, path: Path, par, *, together: bool) -> None:
    """Adapter tensors, optimizers, schedules (then the config's optim settings) and data position of ``job``."""
    _load_params(job, state, path, par)
    for n in job.optimizers:
        par.load_optimizer_state(job.optimizers[n], state.optimizers[n])
        job.schedulers[n].load_state_dict(state.schedulers[n])
        follow_settings(job.optimizers[n], job.schedulers[n], job.params[n], job.optim)
    if together:
        job.state, job.step, job.skipped = (
            SamplerState.from_dict(state.data[job.name]),
            state.extra["steps"][job.name],
            state.extra["skipped"][job.name],
        )
    else:
        job.state, job.step, job.skipped = SamplerState.from_dict(state.data), state.step, state.extra.get("skipped", 0)
    _report_settings(job, state.extra.get("optim", {}).get(job.name), path, named=together)


def _report_settings(job, saved: dict | None, path: Path, *, named: bool) -> None:
    """One line naming the optim settings that differ from those the checkpoint was trained with."""
    nxt, lr = job.step + 1, job.schedulers[job.name].get_last_lr()[0]
    if saved is None:
        log.info(
            "checkpoint '%s' records no optim settings (an earlier moetune wrote it): from step %d on, lr, "
            "schedule and max_steps are the config's (lr %.4g)",
            path,
            nxt,
            lr,
        )
        return
    now = state_settings(job.optim)
    changed = [f"optim.{k} {saved.get(k)} -> {now[k]}" for k in STATE_KEYS if saved.get(k) != now[k]]
    if changed:
        log.warning(
            "%sresuming at step %d with changed settings: %s; from step %d on, the lr follows the config's schedule "
            "(lr %.4g at step %d) and Adam's moments carry over",
            f"adapter '{job.name}': " if named else "",
            job.step,
            ", ".join(changed),
            nxt,
            lr,
            nxt,
        )


def _load_params(job, state: TrainState, path: Path, par) -> None:
    with torch.no_grad():
        for name, params in job.params.items():
            tensors = state.adapters[name]
            extra = sorted(set(tensors) - set(params))
            if extra:  # fewer modules adapted now: say so before the optimizer state fails to fit
                raise CheckpointError(
                    f"checkpoint '{path}': adapter '{name}' holds tensor '{extra[0]}', which the config does not "
                    f"make ({len(extra)} such); was it made with different adapter settings (target_modules, "
                    "layers_to_transform)?"
                )
            for key, p in params.items():
                if key not in tensors or tensors[key].shape != p.shape:
                    raise CheckpointError(
                        f"checkpoint '{path}': adapter '{name}' tensor '{key}' is missing or has another shape; "
                        "was it made with a different config?"
                    )
                par.load_tensor(p, tensors[key])


def _warn_global_batch(path: Path, state: TrainState, now: int) -> None:
    saved = state.extra.get("global_batch")
    if saved is not None and saved != now:
        log.warning(
            "checkpoint '%s' was trained with a global batch of %d rows, this run has %d (batch_size x ranks); "
            "the data position carries over, the loss sequence will not match",
            path,
            saved,
            now,
        )
