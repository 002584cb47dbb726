"""FSDP2 sharding of the model, and the DTensor helpers that turn a rank's shard into the full
tensor and back (checkpoints and adapter files hold full tensors).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def local_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out like ``param``: this rank's shard of it for a DTensor."""
    if not is_dtensor(param):
        return value.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    local = value.to(device=param.to_local().device, dtype=param.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)


def shard_model(model: nn.Module, *, device: torch.device, world_size: int) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head).

    Parameters keep their dtypes (frozen base in the model dtype, adapters fp32); gradients of the
    fp32 adapters are reduced in fp32 and summed (divide factor 1), because each rank's loss is
    already weighted by its share of the global batch's tokens.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"distributed.strategy: fsdp needs a model with model.layers; {type(model).__name__} has none (use "
            "replicate)"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
