"""A cheap check that a ``.safetensors`` file is whole, before anything reads its tensors.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header (tensor
name -> dtype, shape, ``data_offsets`` [begin, end) into the data section) and the data section.
Reading only the length and the header and comparing with the file size finds an empty file, a
file that is not safetensors at all, and a truncated download or copy, without touching the
tensor data. Every layer that opens a user's safetensors file (model, adapter, training
checkpoint, ``moetune inspect``) checks it here first, so the error names the file and says what
is wrong instead of surfacing the reader's internal message.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .errors import CheckpointError, MoetuneError

# The safetensors reader refuses headers above 100 MB; a larger length field is not a header.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the safetensors file at ``path``, or None when its header and size agree.

    Reads the 8-byte length and the JSON header only. The answer completes the sentence
    ``'<path>' ...`` (e.g. "is empty (0 bytes)").
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if size == 0:
                return "is empty (0 bytes)"
            if len(head) < 8:
                return f"is not a safetensors file (header unreadable: the file has only {size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length == 0:
                return f"is not a safetensors file (header unreadable: its length field says {length:,} bytes)"
            if 8 + length > size:
                return (
                    f"is truncated inside its header: the header is {length:,} bytes, "
                    f"the file has {size:,} bytes in all"
                )
            raw = f.read(length)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "is not a safetensors file (header unreadable: not UTF-8 text)"
    except json.JSONDecodeError as exc:
        return f"is not a safetensors file (header unreadable: not JSON, {exc.msg} at byte {exc.pos})"
    if not isinstance(header, dict):
        return "is not a safetensors file (header unreadable: not a JSON object)"
    need, problem = _data_bytes(header)
    if problem:
        return f"is not a safetensors file (header unreadable: {problem})"
    have = size - 8 - length
    if have < need:
        return f"is truncated: header says {need:,} bytes of tensor data, file has {have:,}"
    if have > need:
        return f"is damaged: header says {need:,} bytes of tensor data, file has {have:,} (extra bytes at the end)"
    return None


def _data_bytes(header: dict) -> tuple[int, str | None]:
    """Size of the data section the header describes, or a description of what is inconsistent."""
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(d) for d in shape)
        except (TypeError, KeyError, ValueError):
            return 0, f"tensor '{name}' has no valid dtype, shape and data_offsets"
        width = DTYPE_BYTES.get(dtype)
        if width is not None and (not 0 <= begin <= stop or stop - begin != numel * width):
            return (
                0,
                f"tensor '{name}' has data_offsets {[begin, stop]} that do not fit its {dtype} shape {list(shape)}",
            )
        end = max(end, stop)
    return end, None


def check_safetensors(path: str | os.PathLike, *, error: type[MoetuneError] = CheckpointError) -> None:
    """Raise ``error`` naming ``path`` and what is wrong when :func:`safetensors_problem` finds a problem."""
    problem = safetensors_problem(path)
    if problem:
        raise error(f"'{path}' {problem}")
