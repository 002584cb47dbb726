"""How a process that joined a process group ends: with its status, without the interpreter's teardown.

Now and then, under load, a rank of a finished run aborted after its last write (SIGABRT,
"terminate called without an active exception"; torchrun then reports the run failed). What was
seen: after ``destroy_process_group`` and a garbage collection the gloo backend's worker threads
still run in every rank, under ``fsdp`` and ``replicate`` alike, so something still holds the group
(under FSDP2, its parameters' hooks keep the device mesh alive through reference cycles that pass
through C++, which the garbage collector cannot see). The message is what a thread prints
when it is ended by ``pthread_exit`` through a C++ frame that cannot unwind, and CPython ends that
way any thread that takes the GIL while the interpreter finalizes - as a gloo worker must when it
drops the last reference to a tensor with a Python object. Skipping finalization closes that window
whatever holds the group. Everything a run writes is closed by then (written to a temporary name,
then renamed), so such a process flushes its logs and streams and leaves with ``os._exit``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

_joined = False


def joined_process_group() -> None:
    """This process joined a process group: :func:`exit_process` skips the teardown."""
    global _joined
    _joined = True


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``: ``sys.exit``, or after a process group, flush and ``os._exit``."""
    if not _joined:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)
