"""SIGINT and SIGTERM: a clean stop with a known exit status.

Python turns SIGINT into :class:`KeyboardInterrupt`; SIGTERM (what ``kill``, schedulers and
container runtimes send) would end the process at once, silently. :func:`sigterm_raises` makes
SIGTERM raise :class:`Terminated` instead, so the command line can print one line and exit 143
(128 + 15; 130 for SIGINT).

Training must not stop in the middle of a step (a half-applied optimizer step or data position
cannot be resumed exactly), so while it runs :class:`StopRequest` only records a first SIGINT or
SIGTERM; the loop finishes the step, writes a checkpoint and raises :meth:`StopRequest.exception`.
A second signal raises at once. Handlers are installed only on the main thread (Python delivers
signals there alone) and the previous ones are restored on leaving.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(BaseException):
    """SIGTERM arrived: the counterpart of :class:`KeyboardInterrupt`; the process exits 143.

    A ``BaseException`` like ``KeyboardInterrupt``, so ``except Exception`` blocks let it through.
    """


def interruption(signum: int, message: str = "") -> BaseException:
    """The exception that stands for signal ``signum`` (SIGINT or SIGTERM)."""
    return KeyboardInterrupt(message) if signum == signal.SIGINT else Terminated(message)


@contextlib.contextmanager
def _handlers(handlers: dict[int, Callable]) -> Iterator[bool]:
    """Install ``handlers`` for the block (main thread only; yields whether they were installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {}
    try:
        for signum, handler in handlers.items():
            previous[signum] = signal.signal(signum, handler)
        yield True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block (on the main thread), SIGTERM raises :class:`Terminated`."""
    with _handlers({signal.SIGTERM: _raise_terminated}):
        yield


class StopRequest:
    """Inside ``with StopRequest() as stop:``, a first SIGINT or SIGTERM sets :attr:`signum` and
    nothing else; the loop checks :attr:`requested` between steps. A second one raises at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._stack = contextlib.ExitStack()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exception(self, message: str = "", *, default: int = signal.SIGTERM) -> BaseException:
        """The exception to end the run with (``default``: when another rank received the signal)."""
        return interruption(self.signum or default, message)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - a signal handler's signature
        if self.signum is not None:
            raise interruption(signum, "stopped at once on a second signal; no checkpoint written")
        self.signum = signum

    def __enter__(self) -> StopRequest:
        self._stack.enter_context(_handlers({signal.SIGINT: self._handle, signal.SIGTERM: self._handle}))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
