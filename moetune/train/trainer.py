"""``train()``: a run from its configuration to its adapter folders.

The loop itself is :mod:`.loop` (one for every run: a list of jobs, one per trained adapter);
:class:`Trainer` and :class:`TrainResult` are importable from here too.

Resume is exact: the checkpoint holds adapter weights, optimizer and scheduler state, every RNG
state, the data position, AdaLoRA's allocator state and the fp16 loss scale (see :mod:`.state`), so N
steps straight and N/2 + resume produce bitwise-identical losses and weights on CPU.
"""

from __future__ import annotations

from ..config import TrainConfig
from .distributed import distributed_run
from .jobs import check_supported
from .loop import Trainer
from .results import TrainResult, peak_memory_gib
from .resume import check_resume
from .run_folder import open_run_folder, plan_run_folder, resolve_resume, run_view
from .setup import prepare_run

__all__ = ["TrainResult", "Trainer", "peak_memory_gib", "train"]


def train(
    config: TrainConfig, *, resume: str | bool | None = None, overwrite: bool = False, model=None, tokenizer=None
) -> TrainResult:
    """Run training as configured; returns where things went and what happened.

    ``checkpoint.output_dir`` must be new or empty, or hold this run (``resume``: continue from its
    latest checkpoint, or from the checkpoint folder ``resume`` names), or ``overwrite``: start over,
    deleting only what the earlier run wrote there (see :mod:`.run_folder`). That and the optional
    dependencies are checked before anything is loaded or written, and so is the checkpoint: it must be
    this run's (or start a new run, in a new or empty folder), with the same adapters (see :mod:`.resume`).
    The optim settings may change: the resumed run follows them from its next step (see :mod:`.state`).

    Started by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set), this process joins the process group
    and trains as one rank of a data-parallel run (see :mod:`.distributed`).
    """
    config = config.single_adapter_view()  # one adapter: its own data/optim keys are the run's
    plan = plan_run_folder(config, resume=resume, overwrite=overwrite)
    checkpoint = resolve_resume(config, resume, plan.run_id)
    if checkpoint is not None:
        check_resume(config, plan, checkpoint)
    with distributed_run(config) as (config, parallel):
        check_supported(config, parallel.world_size)  # before the model is loaded
        shard = (parallel.rank, parallel.world_size) if parallel.strategy == "fsdp" else None
        parts = prepare_run(config, model=model, tokenizer=tokenizer, shard=shard)
        parallel.barrier()  # every rank has checked the folder (plan) before rank 0 changes it
        folder = open_run_folder(plan) if parallel.is_main else run_view(plan)
        parallel.barrier()
        return Trainer(config, parts, folder=folder, parallel=parallel).run(resume=checkpoint)
