"""Count the operations that make the host wait for the device, for tests of a training step.

On a GPU these stall the CPU until every queued kernel has run (and break CUDA graphs); on the CPU
they cost nothing, so a CPU test can only find them by name. Two modes watch together:
``TorchDispatchMode`` sees aten ops (``_local_scalar_dense`` behind ``item``/``bool``/``int``,
``nonzero``, ``bincount``, boolean-mask indexing, ``repeat_interleave`` with tensor repeats and no
``output_size``, ...); ``TorchFunctionMode`` sees the tensor methods that read memory on the host
without an aten op (``tolist``, ``numpy``, ``cpu``), and tensors made from Python data
(``torch.tensor``, ``as_tensor``, ``new_tensor``): built on the host, then copied to a GPU with a
copy that waits for the stream. (A Python scalar written into a tensor, ``t[i] = 1.0``, is filled
on the device and is not counted.)
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose output size or value depends on tensor data: the host reads the device
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "bincount",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "equal",
    "is_nonzero",
    "allclose",
    "histc",
}
SYNC_METHODS = {"tolist", "numpy", "cpu"}
FROM_HOST_DATA = {"tensor", "as_tensor", "new_tensor", "asarray"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _dispatch_hit(func, args, kwargs) -> str | None:
    name = func._schema.name.split("::")[-1]
    if name in SYNC_OPS:
        return name
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and args[0].dtype != torch.bool:
        repeats = args[0] if func._overloadname == "Tensor" else args[1] if len(args) > 1 else None
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "repeat_interleave(tensor repeats)"
    if name in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
        return f"{name}(boolean mask)"
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = _dispatch_hit(func, args, kwargs)
        if hit:
            self.record(hit)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS or (name == "to" and _to_host(args, kwargs or {})):
            self.record(f"Tensor.{name}")
        elif name in FROM_HOST_DATA and not isinstance(_data_arg(name, args, kwargs or {}), torch.Tensor):
            self.record(f"{name}(host data)")
        return func(*args, **(kwargs or {}))


def _data_arg(name: str, args, kwargs):
    data = args[1:] if name == "new_tensor" else args  # new_tensor is a method: args[0] is the tensor
    return data[0] if data else kwargs.get("data")


def _to_host(args, kwargs) -> bool:
    dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return dev is not None and torch.device(dev).type == "cpu"


class HostSyncCounter:
    """Context manager: ``counts`` (op -> calls) and ``where`` (op -> first call's stack)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: dict[str, str] = {}

    def _record(self, name: str) -> None:
        self.counts[name] += 1
        if name not in self.where:
            frames = [f for f in traceback.extract_stack()[:-3] if "/moetune/" in f.filename]
            self.where[name] = "".join(traceback.format_list(frames[-6:]))

    def __enter__(self) -> HostSyncCounter:
        self._modes = [_Function(self._record), _Dispatch(self._record)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"{op} x{n}, first at:\n{self.where[op]}" for op, n in self.counts.items())
