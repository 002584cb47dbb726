"""Launch set-up under ``torchrun``: this process's rank from the launcher's environment, and the
device, backend and strategy the run resolves to on it (see :mod:`moetune.train.distributed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import ConfigError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a ``torchrun`` launch."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv | None:
    """The torchrun variables, or None when this process was not started by a launcher.

    Raises:
        ConfigError: only some of the variables are set, or they are not consistent integers.
    """
    env = os.environ if environ is None else environ
    present = [k for k in ENV_KEYS if k in env]
    if not present:
        return None
    if len(present) != len(ENV_KEYS):
        missing = ", ".join(k for k in ENV_KEYS if k not in env)
        raise ConfigError(f"distributed launch: {', '.join(present)} set but {missing} missing; start with torchrun")
    try:
        rank, world, local = (int(env[k]) for k in ENV_KEYS)
    except ValueError:
        raise ConfigError(
            f"distributed launch: RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {[env[k] for k in ENV_KEYS]}"
        ) from None
    if not (0 <= rank < world and 0 <= local < world):
        raise ConfigError(
            f"distributed launch: need 0 <= RANK, LOCAL_RANK < WORLD_SIZE; got RANK={rank}, LOCAL_RANK={local}, "
            f"WORLD_SIZE={world}"
        )
    return LaunchEnv(rank=rank, world_size=world, local_rank=local)


def is_main_process() -> bool:
    """Rank 0 of the process group (or of the launch), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def resolve_launch(config: TrainConfig, env: LaunchEnv) -> tuple[torch.device, str, str]:
    """Device, backend and strategy of this rank.

    Raises:
        ConfigError: the device, backend or strategy cannot run here or with this config.
    """
    spec, section = config.model.device, config.distributed
    cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    if spec == "mps":
        raise ConfigError("model.device: mps cannot run distributed training; use cuda or cpu")
    if cuda:
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise ConfigError(
                f"model.device: {spec} under torchrun needs one GPU per local rank; local rank {env.local_rank} but "
                f"{count} GPU(s) visible"
            )
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    backend = section.backend if section.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("distributed.backend: nccl needs CUDA devices; use gloo on CPU")
    available = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available}[backend]()
    if not available:
        raise ConfigError(f"distributed.backend: {backend} is not available in this PyTorch build")
    strategy = section.strategy
    if strategy == "auto":
        strategy = "fsdp" if cuda and env.world_size > 1 else "replicate"
    if strategy == "fsdp" and config.model.dtype == "fp16":
        raise ConfigError(
            "model.dtype: fp16 with distributed.strategy: fsdp is not supported (the fp16 loss scaler needs the "
            "full gradient on every rank to agree on overflows); use bf16, or distributed.strategy: replicate"
        )
    return device, backend, strategy
