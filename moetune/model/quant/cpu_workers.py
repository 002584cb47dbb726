"""CPU work handed to one worker thread per core, each running its torch ops on one thread.

Quantizing a weight at load is about ten elementwise passes and two table lookups per chunk. On
torch's intra-op threads every pass forks and joins, and the lookups (``index_select``) use one
thread only; one-thread workers that each take whole chunks keep every core busy instead, while
the loader reads the next tensor. Results are the same bytes: each chunk writes its own slice, and
no op used depends on the thread count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch

_PREFIX = "moetune-cpu-worker"
QUEUED_PER_WORKER = 2  # chunks waiting per worker: enough to never idle, few enough to bound memory


class _Workers(NamedTuple):
    pool: ThreadPoolExecutor
    queued: threading.BoundedSemaphore  # a slot per chunk queued or running


_workers: _Workers | None = None
_lock = threading.Lock()


def submit(work: Callable[[], object]) -> Future:
    """Run ``work()`` on a worker and return its future. The caller waits here while the queue is
    full. With one core, or when already on a worker, ``work`` runs now (its error raised now)."""
    if torch.get_num_threads() < 2 or threading.current_thread().name.startswith(_PREFIX):
        done: Future = Future()
        done.set_result(work())
        return done
    pool, queued = _pool()
    queued.acquire()
    future = pool.submit(work)
    future.add_done_callback(lambda _: queued.release())
    return future


def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.ones(1 << 16).add_(1)  # a thread reads its count at its first parallel op: fix it at 1 now


def _pool() -> _Workers:
    global _workers
    with _lock:
        if _workers is None:
            n = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix=_PREFIX, initializer=_one_thread)
            started = threading.Barrier(n)
            list(pool.map(lambda _: started.wait(), range(n)))  # n distinct threads, each initialized
            torch.set_num_threads(n)  # a worker's setting is global for threads started later: restore it
            _workers = _Workers(pool, threading.BoundedSemaphore(QUEUED_PER_WORKER * n))
        return _workers


def shutdown() -> None:
    """Stop the workers once their queued work is done; a new pool is made when next needed."""
    global _workers
    with _lock:
        workers, _workers = _workers, None
    if workers is not None:
        workers.pool.shutdown(wait=True)


def _forget_after_fork() -> None:
    """A forked child has none of the parent's threads: a new pool is made there when needed."""
    global _workers, _lock
    _workers, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
