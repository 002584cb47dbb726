"""Which adapter each token of a forward runs: a context the adapter layers read, set by hooks.

One forward can serve a batch that mixes adapters (``model(..., adapter_names=[...])``, one name
per sample). The model does not know adapters: :func:`install_hooks` (called by ``add_adapter``)
puts a forward pre-hook and a forward hook on the model, which set an :class:`AdapterContext` for
the duration of the call from the call's own arguments - ``adapter_names`` and the token layout
(``input_ids`` (B, T), ``attention_mask``) - and hand what the adapter layers reported
(``records``) to the output. Adapter layers read it with :func:`current_context`. It is a
``ContextVar``: nested or concurrent forwards never see each other's, and the model's
recomputations in backward (activation checkpointing, the loss's LM-head chunks) run in a copy of
the forward's ``contextvars`` context (:func:`moetune.model.context.in_forward_context`), so they
see the same one.

Rows: inside the decoder a layer's input rows are the forward's ``B*T`` tokens in batch order.
When the model calls a module on some tokens only (the LM head on the loss's chunks), it says
which (:func:`moetune.model.context.token_rows`); :meth:`AdapterContext.sample_of_rows` maps
either to samples.

What a layer reads is a :class:`Selection`: the names and the per-sample tensors of one call,
built once per forward. Inside a decoder block it is not read from the ``ContextVar`` at all: hooks
on the block (:func:`moetune.peft.core.layer.install_selection_hooks`) hand it to the block's adapter
layers before the block's forward runs and take it back after, outside the block's forward, so a
block compiled with ``fullgraph=True`` traces no ``ContextVar`` read and no host data.
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ...model.context import token_rows
from .selection import SampleRuns
from .state import adapter_state

__all__ = ["EVERYWHERE", "AdapterContext", "Selection", "adapter_context", "current_context", "install_hooks"]


@dataclass(frozen=True)
class Selection:
    """Which adapters run on which rows of a module call, as tensors built before the call.

    Attributes:
        names: the adapters some row of the call asks for (per-sample ``adapter_names``); None:
            no per-sample names, every active adapter runs on every row.
        batch_size: B of the forward.
        sample_masks: adapter name -> (B,) bool, the samples that use it, for every name in ``names``.
        sample_of_row: (n,) sample index of each row of the call: the ``B*T`` tokens in batch order
            inside the decoder, a chunk's rows for the LM head in the loss.
        runs: the forward's choice as host data (runs of samples, their adapter slots), from
            which a layer knows each adapter's rows without reading the device.
        rows: the call's rows, flat positions in the forward's ``B*T`` tokens.
        slot_of_token: (B*T,) int64 adapter slot of each token of the forward (see
            :class:`~.selection.SampleRuns`), for layers that regroup rows by adapter.
    """

    names: frozenset[str] | None = None
    batch_size: int = 0
    sample_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_of_row: torch.Tensor | None = None
    runs: SampleRuns | None = None
    rows: range | None = None
    slot_of_token: torch.Tensor | None = None

    def sample_mask(self, name: str) -> torch.Tensor | None:
        """(B,) bool mask of the samples that use ``name``, or None when all samples do."""
        return None if self.names is None else self.sample_masks[name]


EVERYWHERE = Selection()  # no per-sample names: the active adapters on every row


@dataclass
class AdapterContext:
    """What a forward runs on, as adapter layers need it.

    Attributes:
        batch_size: B of the current forward.
        seq_len: T of the current forward.
        adapter_names: one entry per sample (None = base only), or None for "all active adapters".
        token_mask: (B*T,) 1 for real tokens, 0 for padding, or None when there is no padding.
        records: what adapter layers report about this forward (the routing statistics of
            adapter mixtures), keyed by the reporter; the forward hook puts a copy on the
            output. A key is written again, not added, when checkpointing recomputes a layer.
        extras: caches of adapter layers for the full token layout (per-adapter row masks).
        device: where the forward's tokens are (the selection's tensors are made there).
    """

    batch_size: int
    seq_len: int
    adapter_names: list[str | None] | None = None
    token_mask: torch.Tensor | None = None
    device: torch.device | None = None
    records: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    reset: Token | None = field(default=None, repr=False)  # undoes the hook's set
    owner: nn.Module | None = field(default=None, repr=False)  # the model whose hooks set it

    def sample_of_token(self, device: torch.device) -> torch.Tensor:
        """Sample index of each flattened token, shape (B*T,)."""
        key = ("sample_of_token", device)
        if key not in self.extras:
            self.extras[key] = torch.arange(self.batch_size, device=device).repeat_interleave(self.seq_len)
        return self.extras[key]

    def sample_of_rows(self, device: torch.device) -> torch.Tensor:
        """Sample index of each input row of the current module call: (n,) when the model runs
        it on some tokens (:func:`~moetune.model.context.token_rows`), else (B*T,)."""
        rows = token_rows()
        if rows is None:
            return self.sample_of_token(device)
        return torch.arange(rows.start, rows.stop, device=device) // self.seq_len

    def selection(self, rows: range | None = None) -> Selection:
        """The :class:`Selection` of a call on the tokens ``rows`` (flat positions in ``B*T``), or on
        every token in batch order (None, the decoder's calls: made once per forward and kept)."""
        if self.adapter_names is None:
            return EVERYWHERE
        if rows is None:
            if "selection" not in self.extras:
                self.extras["selection"] = self._selection(range(self.batch_size * self.seq_len))
            return self.extras["selection"]
        return self._selection(rows)

    def _selection(self, rows: range) -> Selection:
        if "runs" not in self.extras:  # once per forward; filled on the device, no copy from the host
            runs = SampleRuns.of(self.adapter_names, self.seq_len)
            self.extras["runs"], self.extras["slot_of_token"] = runs, runs.slot_of_token(self.device)
            self.extras["sample_masks"] = {n: runs.sample_mask(n, self.device) for n in runs.names}
        present = self.adapter_names[rows.start // self.seq_len : (rows.stop - 1) // self.seq_len + 1]
        return Selection(
            names=frozenset(n for n in present if n is not None),
            batch_size=self.batch_size,
            sample_masks=self.extras["sample_masks"],
            sample_of_row=torch.arange(rows.start, rows.stop, device=self.device) // self.seq_len,
            runs=self.extras["runs"],
            rows=rows,
            slot_of_token=self.extras["slot_of_token"],
        )


_CONTEXT: ContextVar[AdapterContext | None] = ContextVar("moetune_adapter_context", default=None)


def current_context() -> AdapterContext | None:
    return _CONTEXT.get()


@contextlib.contextmanager
def adapter_context(ctx: AdapterContext | None) -> Iterator[AdapterContext | None]:
    """Run adapter layers called inside the block with ``ctx`` (a module used on its own)."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def context_of_call(input_ids: torch.Tensor, attention_mask, adapter_names) -> AdapterContext:
    """The :class:`AdapterContext` of a forward on ``input_ids`` (B, T) (``adapter_names`` checked against B)."""
    B, T = input_ids.shape
    if adapter_names is not None and len(adapter_names) != B:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {B}")
    token_mask = attention_mask[:, -T:].reshape(-1) if attention_mask is not None else None
    return AdapterContext(
        batch_size=B, seq_len=T, adapter_names=adapter_names, token_mask=token_mask, device=input_ids.device
    )


_SIGNATURES: dict[type, inspect.Signature] = {}


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name, however the caller passed them."""
    cls = type(module)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls].bind(module, *args, **kwargs).arguments


def _before(module: nn.Module, args: tuple, kwargs: dict) -> None:
    given = _call_arguments(module, args, kwargs)
    input_ids = given.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return  # not a causal LM's token batch: adapter layers run their active adapters everywhere
    names = given.get("adapter_names")
    _check_known(module, names)
    ctx = context_of_call(input_ids, given.get("attention_mask"), names)
    ctx.reset, ctx.owner = _CONTEXT.set(ctx), module


def _check_known(model: nn.Module, names) -> None:
    # A misspelt name would otherwise run those samples on the base model: a silently wrong result.
    if names is None:
        return
    known = adapter_state(model).configs
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(
            f"adapter_names: no adapter named {', '.join(map(repr, unknown))} (this model has: "
            f"{', '.join(map(repr, known)) or 'none'}; None = the base model)"
        )


def _after(module: nn.Module, args: tuple, kwargs: dict, output) -> None:  # noqa: ARG001 - the hook's signature
    ctx = _CONTEXT.get()
    if ctx is None or ctx.owner is not module or ctx.reset is None:  # _before set nothing for this call
        return
    _CONTEXT.reset(ctx.reset)
    ctx.reset = ctx.owner = None
    if output is not None and hasattr(output, "records"):
        output.records = dict(ctx.records)


def install_hooks(model: nn.Module) -> None:
    """Give ``model`` (once) the hooks that set the adapter context around each of its forwards.
    The forward hook runs even when the forward raises, so a failed call leaves no context set."""
    state = adapter_state(model)
    if not state.hooked:
        model.register_forward_pre_hook(_before, with_kwargs=True)
        model.register_forward_hook(_after, with_kwargs=True, always_call=True)
        state.hooked = True
