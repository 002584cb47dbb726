"""FSDP2 sharding of the model, and the DTensor helpers that turn a rank's shard into the full
tensor and back (checkpoints and adapter files hold full tensors).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model.quant import StoredWeight

log = logging.getLogger(__name__)


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
    already weighted by its share of the global batch's tokens. A base held in a stored format
    (FP8, INT4, MXFP4, NF4) is sharded too: its stored bytes and scales become frozen parameters,
    which FSDP all-gathers per layer (through a byte view when a layer's dtypes differ) for the
    layer's forward and backward, where they are dequantized.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"distributed.strategy: fsdp needs a model with model.layers; {type(model).__name__} has none (use "
            "replicate)"
        )
    holders = [m for m in model.modules() if isinstance(m, StoredWeight)]
    for holder in holders:
        holder.hold_as_parameters()
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    if holders:
        rank, loaded = mesh.get_rank(), "its own rows" if any(h.shard for h in holders) else "whole"
        for holder in holders:  # FSDP holds them now, all-gathered when their layer runs
            holder.sharded(rank, world_size)
        held, whole = stored_bytes_held(holders)
        formats = "/".join(sorted({h.format for h in holders}))
        log.info(
            "rank %d/%d holds %d of %d bytes of the base's %s weights (loaded %s)",
            *(rank, world_size, held, whole, formats, loaded),
        )


def stored_bytes_held(holders: list[StoredWeight]) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole stored weights): the storage behind each rank's
    shards (FSDP's padding included) and any tensor left whole, each storage counted once."""
    storages: dict[int, int] = {}
    for holder in holders:
        for t in holder.stored_tensors():
            local = t.to_local() if is_dtensor(t) else t
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values()), sum(h.storage_bytes() for h in holders)
