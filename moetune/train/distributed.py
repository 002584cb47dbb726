"""Data-parallel training under ``torchrun``: FSDP2 or replication, with exact global steps.

``torchrun --nproc_per_node N -m moetune train run.yaml`` (or ``moetune train`` started by any
launcher that sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``) joins a process group, NCCL on
CUDA and gloo on CPU. Without those variables the run is one process and
:class:`~moetune.train.parallel.Parallel`, whose hooks change nothing, keeps the loop exactly as it was.

One step on N ranks equals one step of a single process whose batch is the global batch
(``batch_size * N`` rows), within float rounding:

- Loss. Each micro-batch's loss is a mean over its own counted tokens ``n_ri`` (rank r, micro-batch
  i); ranks all-reduce the counts of the step's micro-batches first and each backpropagates
  ``(n_ri / n) * loss_ri`` with ``n = sum_ri n_ri``; gradients are then *summed* over ranks
  (``replicate``: one all-reduce after accumulation; ``fsdp``: reduce-scatter with divide factor 1).
  The sum is the gradient of the mean over all ``n`` tokens of the step, which is what one process
  with the whole step in one batch computes; a single process weights its micro-batches the same
  way (:meth:`Parallel.micro_weights`), so ``batch 2 x grad_accum 4`` is ``batch 8``. (Averaging
  per-rank or per-micro-batch means would over-weight the tokens of rows that happen to be short.)
- Router aux loss. ``E * sum_e f_e * P_e`` is not a sum over tokens. Ranks all-reduce the expert
  counts and token counts (no gradient) and each backpropagates its share: the same formula with
  the global counts and its own probability sums, so the shares add up to the global loss and its
  gradient.
- Gradient accumulation, clipping and the non-finite guard are the trainer's, on global values:
  the clipping norm is the norm of the global gradient, and a step is skipped on every rank when
  any rank sees a non-finite loss or norm.

Dropout. Each rank draws its own masks from its own stream: rank 0 keeps the single-process
stream, rank ``r > 0`` is seeded with a hash of ``(seed, r)`` after the adapters are initialised
(identically everywhere, then broadcast from rank 0). So with ``dropout: 0`` an N-rank run equals
the single-process run; with dropout > 0 it is a statistically equivalent run, not the same
masks (those would need a per-sample counter-based RNG inside every adapter layer; see
docs/distributed.md). A one-rank ``torchrun`` run equals the plain run bitwise, dropout included.

Checkpoints do not depend on the rank count: full adapter tensors (``DTensor.full_tensor()``),
full optimizer state keyed as ``Optimizer.state_dict()`` keys it, the data position in items, and
every rank's RNG state (a rank missing from the checkpoint, when resuming on more ranks, is
reseeded from ``(seed, rank, step)``). Only rank 0 writes checkpoints, metrics, the progress bar
and adapters; all ranks take part in gathering what it writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..data import eval_batches
from ..model.loss import load_balancing_loss
from ..model.moe import RouterStats
from ..peft.core.layer import adapter_layers
from .checkpoint import rng_state, set_rng_state
from .launch import ENV_KEYS, LaunchEnv, is_main_process, launch_env, resolve_launch  # noqa: F401  (importable from here too)
from .parallel import Parallel
from .sharding import full_tensor, is_dtensor, local_like, shard_model
from .teardown import joined_process_group

log = logging.getLogger(__name__)
BUCKET_BYTES = 64 * 2**20  # gradient all-reduce bucket (replicate)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed for rank ``rank``'s dropout stream (independent of the other ranks')."""
    digest = hashlib.sha256(f"moetune:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DataParallel(Parallel):
    """N ranks of one process group; ``strategy`` is ``replicate`` or ``fsdp``."""

    def __init__(self, env: LaunchEnv, *, strategy: str, device: torch.device, seed: int) -> None:
        self.rank, self.world_size, self.is_main = env.rank, env.world_size, env.rank == 0
        self.strategy, self.device, self.seed = strategy, device, seed
        nccl = dist.get_backend() == "nccl"
        self.comm_device = device if nccl else torch.device("cpu")
        self.model: nn.Module | None = None

    # --- set-up ---------------------------------------------------------------------------
    def prepare(self, parts):
        """Make adapters identical on all ranks, shard (fsdp), then give each rank its dropout stream."""
        model = parts.model
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                for _, p in layer.adapter_params(None):
                    buf = p.detach().to(self.comm_device)
                    dist.broadcast(buf, src=0)
                    p.copy_(buf)
        if self.strategy == "fsdp":
            shard_model(model, device=self.device, world_size=self.world_size)
        self.model, parts.device = model, self.device
        if self.rank > 0:
            torch.manual_seed(rank_seed(self.seed, self.rank))

    def _reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        buf = values.to(self.comm_device, copy=True)  # never reduce the caller's tensor in place
        dist.all_reduce(buf, op=op)
        return buf.to(values.device)

    # --- step ----------------------------------------------------------------------------
    def _total(self, count):
        return float(self._reduce(count.reshape(1))[0])

    def aux_loss(self, out, num_experts):
        stats = out.router_stats
        if not stats:
            return out.aux_loss
        counts = torch.stack([s.loss_counts.detach().double() for s in stats])
        tokens = torch.stack([torch.as_tensor(s.tokens).detach().double().to(counts.device) for s in stats])
        total = self._reduce(torch.cat([counts.flatten(), tokens]))
        counts_g, tokens_g = total[: counts.numel()].view_as(counts), total[counts.numel() :]
        shares = [
            RouterStats(
                counts=counts_g[i].to(s.counts.dtype), prob_sum=s.prob_sum, tokens=tokens_g[i].to(s.prob_sum.dtype)
            )
            for i, s in enumerate(stats)
        ]
        return load_balancing_loss(shares, num_experts)

    def gradient_sync(self, enabled):
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(enabled)

    def sync_grads(self, params):
        if self.strategy == "fsdp":
            return
        has = self._reduce(torch.tensor([p.grad is not None for p in params], dtype=torch.float32), dist.ReduceOp.MAX)
        synced = []
        for p, flag in zip(params, has.tolist()):
            if flag:
                if p.grad is None:  # another rank has a gradient for it: the sum is not None
                    p.grad = torch.zeros_like(p)
                synced.append(p.grad)
        for bucket in _buckets(synced, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(self.comm_device)
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def clip_grad_norm(self, params, max_norm):
        if self.strategy != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)  # gradients are identical everywhere
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norm = full_tensor(norm)
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
        return norm

    def all_ok(self, ok):
        bad = self._reduce(torch.tensor([0.0 if ok else 1.0]), dist.ReduceOp.MAX)
        return bool(bad.item() == 0)

    def sum_floats(self, *values):
        return self._reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def router_stats(self, stats):
        if not stats:
            return stats
        parts = [
            torch.cat(
                [
                    s.counts.detach().double().reshape(-1),
                    s.prob_sum.detach().double().reshape(-1),
                    torch.as_tensor(s.tokens).detach().double().reshape(1).to(s.counts.device),
                ]
            )
            for s in stats
        ]
        total = self._reduce(torch.stack(parts))
        E = stats[0].counts.numel()
        return [RouterStats(counts=row[:E], prob_sum=row[E : 2 * E], tokens=row[2 * E]) for row in total]

    def eval_batches(self, examples, *, batch_size, pad_id):
        """Rank r evaluates examples r, r+N, ...; under FSDP every rank must run as many forwards
        (each all-gathers), so ranks with fewer batches repeat a batch that is not counted."""
        mine = list(
            eval_batches(examples, batch_size=batch_size, pad_id=pad_id, rank=self.rank, world_size=self.world_size)
        )
        yield from ((b, True) for b in mine)
        if self.strategy != "fsdp" or not examples:
            return
        most = -(-len(examples[0 :: self.world_size]) // batch_size)  # rank 0 has the most
        filler = mine[0] if mine else next(eval_batches(examples[:1], batch_size=1, pad_id=pad_id))
        for _ in range(most - len(mine)):
            yield filler, False

    # --- checkpoints ------------------------------------------------------------------------
    def full_tensor(self, t):
        return full_tensor(t)

    def load_tensor(self, param, value):
        param.copy_(local_like(param, value))

    def full_optimizer_state(self, optimizer):
        state = optimizer.state_dict()
        full = {
            k: {n: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
            for k, s in state["state"].items()
        }
        return {"state": full, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer, state):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        local = {}
        for k, s in state["state"].items():
            p = params[k]
            local[k] = {
                n: local_like(p, v) if isinstance(v, torch.Tensor) and v.shape == p.shape else v for n, v in s.items()
            }
        optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})

    def rng_state(self):
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, rng_state())
        return {**states[0], "ranks": states}

    def set_rng_state(self, state, *, seed, step):
        ranks = state.get("ranks") or [state]
        if len(ranks) != self.world_size:
            log.info(
                "checkpoint from %d rank(s), resuming on %d: runs with dropout > 0 draw other masks than the "
                "uninterrupted run",
                len(ranks),
                self.world_size,
            )
        if self.rank < len(ranks):
            set_rng_state(ranks[self.rank])
        else:
            set_rng_state(ranks[0])
            torch.manual_seed(rank_seed(seed, self.rank, step))

    @contextlib.contextmanager
    def full_adapters(self, model):
        """Swap every sharded adapter parameter for its full tensor (collective), then swap back."""
        ids = {id(p) for _, layer in adapter_layers(model) for _, p in layer.adapter_params(None)}
        swapped = []
        for _, layer in adapter_layers(model):
            for module in layer.modules():
                for key, p in list(module._parameters.items()):
                    if p is not None and id(p) in ids and is_dtensor(p):
                        module._parameters[key] = nn.Parameter(p.full_tensor(), requires_grad=False)
                        swapped.append((module, key, p))
        try:
            yield
        finally:
            for module, key, p in swapped:
                module._parameters[key] = p

    def barrier(self):
        dist.barrier()


def _buckets(tensors: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= limit:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


@contextlib.contextmanager
def distributed_run(config: TrainConfig) -> Iterator[tuple[TrainConfig, Parallel]]:
    """Join the torchrun process group if launched by torchrun; yield the config to build the run
    from (device set to this rank's) and the :class:`Parallel` to train with."""
    if not dist.is_available() or (env := launch_env()) is None:
        yield config, Parallel()
        return
    device, backend, strategy = resolve_launch(config, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=config.distributed.timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        joined_process_group()
    # FSDP on CUDA: load on the CPU and let fully_shard move one layer's shard at a time to the GPU.
    load_on = "cpu" if strategy == "fsdp" else str(device)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=load_on))
    log.info("rank %d/%d on %s: %s, %s", env.rank, env.world_size, device, backend, strategy)
    try:
        yield config, DataParallel(env, strategy=strategy, device=device, seed=config.seed)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
