"""The marker file that records what moetune wrote into a folder, and atomic file writes.

A folder moetune writes holds :data:`MARKER`, listing the kind of output and the top-level entries
moetune wrote there; everything that replaces or deletes files reads it first (:mod:`.outputs`,
:mod:`.removal`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = ".moetune-output.json"


@dataclass(frozen=True)
class Marker:
    """What moetune wrote into a folder: the kind of output and its top-level entries."""

    kind: str
    files: tuple[str, ...] = ()
    run_id: str | None = None

    def to_json(self) -> str:
        body = {"kind": self.kind, "files": sorted(self.files)}
        if self.run_id is not None:
            body["run_id"] = self.run_id
        return json.dumps(body, indent=2) + "\n"


def read_marker(folder: str | os.PathLike) -> Marker | None:
    """The folder's marker, or None when moetune has not recorded writing there (or it is unreadable)."""
    path = Path(folder) / MARKER
    try:
        body = json.loads(path.read_text())
        return Marker(kind=str(body["kind"]), files=tuple(body.get("files", ())), run_id=body.get("run_id"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Replace one file atomically: ``write(tmp)`` writes a temporary file beside it, which is then
    renamed over ``path`` (a crash leaves the old file or the new one, never half of one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_text(text))


def write_marker(folder: Path, marker: Marker) -> None:
    write_text_atomic(folder / MARKER, marker.to_json())
