"""The model's token layout as sub-modules see it, and running a recomputation in its forward's context.

The decoder runs every module on all ``B*T`` tokens of the batch, shaped (B, T, ...) or flattened
(B*T, ...) in batch order. The loss is the one exception: it runs the LM head on chunks of the
positions in chunks. While it does, :func:`token_rows` gives the range of flat positions (into
the ``B*T`` tokens) of the rows the head is called on, so a module that needs to know which token
a row is (an adapter chosen per sample, in ``peft/``) can map them; outside such a call it is None.
A ``range`` is known on the host, so mapping it needs no device sync.
The model says where its rows come from and nothing else: it knows no adapters.

:func:`in_forward_context` is for recomputation: activation checkpointing runs a layer (or a
loss chunk) again during backward, after the forward and whatever context it ran in are gone.
The function it returns runs in a copy of the ``contextvars`` context captured when it was made,
so anything a forward hook put in a ``ContextVar`` (peft's adapter selection) is seen again,
unchanged, without the model knowing what it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

_ROWS: ContextVar[range | None] = ContextVar("moetune_token_rows", default=None)

R = TypeVar("R")


def token_rows() -> range | None:
    """The flat token positions (into ``B*T``) of the rows of the current sub-module call, or None
    when the call covers every token of the forward in batch order."""
    return _ROWS.get()


@contextlib.contextmanager
def on_rows(rows: range) -> Iterator[None]:
    """Sub-module calls inside the block run on the tokens ``rows`` (flat positions in ``B*T``)."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def in_forward_context(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` run, now and whenever called later (a recompute in backward), in a copy of the
    current ``contextvars`` context."""
    return functools.partial(contextvars.copy_context().run, fn)
