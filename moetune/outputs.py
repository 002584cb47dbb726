"""Where moetune may write: folders it owns, recorded in a marker file, and atomic folder writes.

The rule every writing command follows: an output goes into a folder that does not exist, is
empty, or that moetune itself wrote for the same kind of output. Ownership is recorded in a small
marker file (:data:`MARKER`) that lists the top-level entries moetune wrote there. Anything else is
refused with one line. ``overwrite=True`` lets moetune write *beside* files it did not write; it
still never deletes or replaces them (a name that collides with such a file is refused too).
Replacing moetune's own earlier output removes only the entries its marker lists, and inside
them only what moetune wrote (:mod:`.removal`).

A folder output is written into a hidden temporary folder next to the target and moved into place
when complete, so a kill at any moment leaves either the old output or the new one, never a mix
under the real name (when foreign files share the folder, each entry is moved in atomically).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from .errors import MoetuneError
from .markers import MARKER, Marker, read_marker, write_marker
from .markers import write_file_atomic as write_file_atomic  # where the writers of single files import it from
from .markers import write_text_atomic as write_text_atomic
from .removal import describe_kept, remove_ours

log = logging.getLogger(__name__)


class OutputError(MoetuneError):
    """An output location moetune may not write to (it would lose or mix someone's files)."""


def record_entries(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add entries written into a moetune output folder after it was placed (e.g. extras beside an
    adapter) to its marker, so a later replacement treats them as moetune's."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None:
        write_marker(folder, replace(marker, files=tuple(sorted(set(marker.files) | set(names)))))


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {MARKER}


def _refuse_special(path: Path, key: str, inputs: Iterable[str | os.PathLike]) -> None:
    """The current folder, a folder above it, an input folder or a file are never an output."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(
            f"{key}: '{path}' is the current folder or one above it; give a new or empty folder (e.g. {key} out/)"
        )
    for given in inputs:
        if given is not None and resolved == Path(given).resolve():
            raise OutputError(f"{key}: '{path}' is also an input of this command; give another folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{key}: '{path}' is a file, not a folder; it is left as it is: give a new or empty folder")


def check_output(
    path: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    key: str = "--out",
    inputs: Iterable[str | os.PathLike] = (),
) -> Marker | None:
    """Raise :class:`OutputError` unless a ``kind`` output may go to ``path``; reads, never writes.

    Returns the folder's marker when moetune wrote it before (same kind), else None.
    """
    path = Path(path)
    _refuse_special(path, key, inputs)
    if not path.exists() or not _entries(path):
        return read_marker(path) if path.exists() else None
    marker = read_marker(path)
    if marker is not None and marker.kind == kind:
        return marker
    if marker is not None:
        raise OutputError(
            f"{key}: '{path}' holds moetune's {marker.kind} output; a {kind} is not written into it "
            "(that would mix the two): give another folder"
        )
    if not overwrite:
        raise OutputError(
            f"{key}: '{path}' is not empty and moetune did not write it; give a new or empty folder, "
            "or pass --overwrite to write beside those files (none of them is changed or deleted)"
        )
    return None


def refuse_collisions(path: Path, names: Iterable[str], marker: Marker | None, key: str) -> None:
    """A name moetune is about to write that exists in ``path`` and is not moetune's is refused."""
    if not path.is_dir():
        return
    ours = set(marker.files) if marker else set()
    clash = sorted((_entries(path) - ours) & set(names))
    if clash:
        raise OutputError(
            f"{key}: '{path / clash[0]}' exists and moetune did not write it; it is left as it is: "
            "move it away or give another folder"
        )


def write_folder(
    path: str | os.PathLike,
    kind: str,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    key: str = "--out",
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a folder output: ``write(tmp)`` fills a temporary folder, which is then moved into place.

    Args:
        path: the output folder.
        kind: what it holds (``"model"``, ``"adapter"`` ...); only the same kind replaces it.
        write: fills the folder it is given; everything it writes is recorded as moetune's.
        overwrite: write beside files moetune did not write (never replacing them).
        key: how the user named ``path`` (a CLI option or config key), for messages.
        inputs: folders this command reads; ``path`` must be none of them.
    """
    path = Path(path)
    marker = check_output(path, kind, overwrite=overwrite, key=key, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        names = sorted(_entries(tmp))
        refuse_collisions(path, names, marker, key)
        _place(tmp, path, Marker(kind=kind, files=tuple(names)), marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _place(tmp: Path, path: Path, new: Marker, old: Marker | None) -> None:
    if not path.exists() or not any(path.iterdir()) or _entries(path) <= set(old.files if old else ()):
        write_marker(tmp, new)
        _swap(tmp, path)
        return
    # Beside files moetune did not write: record first (a crash leaves nothing unrecorded), then
    # move entries in one by one and drop our old ones that the new output no longer has.
    ours = set(old.files if old else ()) & _entries(path)
    write_marker(path, replace(new, files=tuple(sorted(ours | set(new.files)))))
    for name in sorted(ours - set(new.files)):
        remove_ours(path / name)
    for name in new.files:
        if (path / name).is_dir() and not (path / name).is_symlink():
            remove_ours(path / name)
        os.replace(tmp / name, path / name)
    write_marker(path, new)


def _swap(tmp: Path, path: Path) -> None:
    """Move a finished folder into place; moetune's own earlier folder is swapped out, then removed."""
    if not path.exists() or not any(path.iterdir()):
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class OwnedFolder:
    """A folder moetune writes entries into over time (a training run, the demo).

    Every entry is claimed with :meth:`entry` before it is written, so the marker always lists
    what moetune may later replace or delete, and nothing else.
    """

    path: Path
    kind: str
    key: str = "checkpoint.output_dir"
    run_id: str | None = None
    files: set[str] = field(default_factory=set)
    writable: bool = True  # False: a view (another rank's), whose entries are never recorded

    def entry(self, name: str) -> Path:
        """The path of top-level entry ``name``, recorded as moetune's; refused if someone else's."""
        if self.writable and name not in self.files:
            target = self.path / name
            if target.exists() or target.is_symlink():
                raise OutputError(
                    f"{self.key}: '{target}' exists and moetune did not write it; it is left as it is: "
                    "move it away or give another folder"
                )
            self.files.add(name)
            write_marker(self.path, Marker(kind=self.kind, files=tuple(self.files), run_id=self.run_id))
        return self.path / name

    def remove_recorded(self) -> None:
        """Delete what moetune recorded writing here (start over), inside its folders too; other
        files stay, said in one warning, and the folders holding them stay recorded."""
        kept = [p for name in sorted(self.files) for p in remove_ours(self.path / name)]
        self.files = {n for n in self.files if (self.path / n).exists() or (self.path / n).is_symlink()}
        write_marker(self.path, Marker(kind=self.kind, files=tuple(self.files), run_id=self.run_id))
        if kept:
            log.warning("%s: %s", self.key, describe_kept(kept))


def open_folder(
    path: str | os.PathLike, kind: str, *, overwrite: bool = False, key: str = "--out", adopt: Iterable[str] = ()
) -> OwnedFolder:
    """Claim ``path`` for a ``kind`` output written entry by entry (see :func:`check_output`).

    ``adopt``: entry names an earlier moetune version wrote without a marker, recorded as moetune's.
    """
    path = Path(path)
    marker = check_output(path, kind, overwrite=overwrite, key=key)
    path.mkdir(parents=True, exist_ok=True)
    files = set(marker.files) & _entries(path) if marker else {n for n in adopt if (path / n).exists()}
    folder = OwnedFolder(path=path, kind=kind, key=key, run_id=marker.run_id if marker else None, files=files)
    write_marker(path, Marker(kind=kind, files=tuple(files), run_id=folder.run_id))
    return folder


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
