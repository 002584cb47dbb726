"""What the GPU-check bench scripts share: their device and size options, timed calls that wait for
the device, and the peak of GPU memory (NaN on CPU, where torch does not track it)."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's options: ``--device`` (default cuda) and ``--tiny`` (toy size, for a smoke test)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    return p


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def timed(call: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds ``call()`` took, its work on the device included, and what it returned."""
    t0 = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - t0, result


def reset_peak(device: str) -> None:
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    """GiB of GPU memory at the most since :func:`reset_peak`; NaN on CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else float("nan")
