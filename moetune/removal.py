"""Deleting moetune's own earlier output, and nothing else.

A user adds files inside moetune's folders: a model card beside an adapter before uploading it,
notes in a run's ``checkpoints/``. Starting a run over (``--overwrite``) or pruning old checkpoints
removes what moetune wrote and keeps those. What moetune wrote is what a folder's marker lists
(:mod:`.markers`); a listed sub-folder is taken apart the same way. A sub-folder without a marker
of its own is a container moetune fills with marked folders (a run's ``checkpoints/``) or with
files of a known name (TensorBoard's event files): only those go. A folder that keeps someone's
file stays, with a marker that lists what remains of moetune's, so it is still moetune's to write
into.
"""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import replace
from pathlib import Path

from .markers import MARKER, read_marker, write_marker

# Unmarked entries moetune writes inside its unmarked containers: TensorBoard's event files, and
# the hidden temporaries an interrupted checkpoint write leaves (``outputs.write_folder``).
CONTAINED_PATTERNS = ("events.out.tfevents.*", ".checkpoint-*.tmp-*", ".checkpoint-*.old-*")


def remove_ours(path: Path) -> list[Path]:
    """Delete what moetune wrote at ``path`` (a file, a marked folder or a container) and return
    the paths it kept because moetune did not write them; a folder left empty goes too."""
    if path.is_symlink() or not path.is_dir():
        if path.exists() or path.is_symlink():
            path.unlink()
        return []
    marker = read_marker(path)
    kept: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.name == MARKER:
            continue
        if marker is not None and child.name in marker.files or marker is None and _marked_folder(child):
            kept += remove_ours(child)
        elif marker is None and any(fnmatch.fnmatchcase(child.name, p) for p in CONTAINED_PATTERNS):
            _delete_whole(child)  # an event file, or a whole temporary of an interrupted write
        else:
            kept.append(child)
    if not kept:
        (path / MARKER).unlink(missing_ok=True)
        path.rmdir()
    elif marker is not None:
        remaining = tuple(n for n in marker.files if (path / n).exists() or (path / n).is_symlink())
        write_marker(path, replace(marker, files=remaining))
    return kept


def _marked_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and read_marker(path) is not None


def _delete_whole(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def describe_kept(kept: list[Path]) -> str:
    """One line naming the files kept (the first few), for a warning."""
    shown = ", ".join(f"'{p}'" for p in kept[:3])
    more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
    return f"kept {len(kept)} file(s) moetune did not write: {shown}{more}"
