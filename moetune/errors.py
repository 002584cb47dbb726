"""User-facing errors.

Anything the user can fix (a config key, a dataset row, a checkpoint file, an adapter file, a CLI
argument) raises :class:`MoetuneError`; the CLI prints its message on one line and exits 2, with no
traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class MoetuneError(Exception):
    """An error caused by user input; the message says what and where."""


class ConfigError(MoetuneError, ValueError):
    """A config file or value is wrong."""


class CheckpointError(MoetuneError):
    """A model checkpoint folder or tensor is wrong or unsupported."""


class AdapterError(MoetuneError):
    """An adapter file, target or option is wrong."""


class DataError(MoetuneError):
    """A dataset file or row is wrong."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
