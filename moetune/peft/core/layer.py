"""The adapter protocol shared by every adapter layer, and per-sample adapter selection.

An adapter layer wraps one base module (``base_layer``) and holds any number of named adapters,
each an adapter object of one small interface (create, remove, parameters, output, weight delta,
file tensors both ways; :mod:`moetune.peft.lora.linear_adapters`,
:mod:`moetune.peft.lora.expert_adapters`), whatever its kind (LoRA, DoRA, PiSSA, AdaLoRA,
mixtures). Everything above it (injection, files, optimizers, merging) talks to it only through
:class:`AdapterLayer`, never by parameter-name patterns or capability probing.

Which adapters run on which tokens:
- by default every name in ``active`` runs on every token (normally one);
- inside :func:`disable_adapters` none run;
- when the forward was called with ``adapter_names`` (one per sample), each token runs only the
  adapter its sample named (None = base only), so one batch can mix adapters (the selection is
  the :class:`~.context.AdapterContext` the model's forward hooks set).

A layer reads the selection through :meth:`AdapterLayer.selection`. Inside a decoder block that is
the :class:`~.context.Selection` the block's hooks (:func:`install_selection_hooks`) put on the layer
before the block's forward and take back after it: the block's forward (what ``train.compile``
compiles, ``fullgraph=True``) reads an attribute holding prepared tensors, never the ``ContextVar``,
and a recompute in backward (activation checkpointing) calls the block again, so its hooks hand
the layers the same selection from the copied context. Anywhere else (the LM head in the loss's
chunks, a layer called on its own) the layer reads the context itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ...errors import AdapterError
from ...model.context import token_rows
from ...model.transformer import DecoderLayer
from .context import EVERYWHERE, Selection, current_context, install_hooks
from .state import adapter_state


@dataclass(frozen=True)
class AddOptions:
    """What :meth:`AdapterLayer.add_adapter` may say besides an adapter's name and config; each
    wrapper reads the fields that apply to it and ignores the others.

    Attributes:
        parts: the projections of an expert layer or a MixLoRA FFN to adapt (``gate_proj``,
            ``up_proj``, ``down_proj``); None: all of them.
        param_configs: a config per base parameter (PEFT's rank_pattern on a routed-experts
            parameter, ``gate_up_proj``), for layers with several parameters.
        adapter: the adapter object to hold (AdaLoRA's SVD form); None: the layer's own kind
            for the config.
    """

    parts: frozenset[str] | None = None
    param_configs: dict[str, Any] | None = None
    adapter: Any = None

    def chosen_parts(self, allowed: tuple[str, ...], what: str) -> set[str]:
        """The parts asked for (all of ``allowed`` when none), each one of ``allowed``."""
        parts = set(self.parts or allowed)
        if not parts <= set(allowed):
            raise AdapterError(f"{what}: unknown parts {sorted(parts - set(allowed))}; allowed: {', '.join(allowed)}")
        return parts


DEFAULT_OPTIONS = AddOptions()


class AdapterLayer(nn.Module):
    """Base class of adapter wrappers. Subclasses implement the abstract methods below."""

    base_layer: nn.Module
    # The ParameterDicts holding the output side ("B", zero at init) of each low-rank pair, which
    # LoRA+ trains at a higher learning rate. Every subclass that holds pairs names its own.
    b_side: tuple[str, ...] = ()
    # Whether target matching looks inside it: its base's children keep their own module paths
    # (a MixLoRA FFN, whose projections can still take other adapters).
    transparent = False
    # The selection the hooks of the decoder block holding the layer hand it for the block's forward.
    installed_selection: Selection | None = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active: list[str] = []
        self.disabled = False
        self.merged: list[str] = []

    # --- protocol -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def add_adapter(self, name: str, config, options: AddOptions = DEFAULT_OPTIONS) -> None:
        """Create adapter ``name`` from a LoraConfig (and initialise it), as ``options`` say."""
        raise NotImplementedError

    @classmethod
    def take_over(cls, layer: AdapterLayer, path: str) -> AdapterLayer:
        """A wrapper of this class holding ``layer``'s base and adapters (the same parameters),
        for a module that already carries adapters of a kind this class extends."""
        raise AdapterError(
            f"{path} already carries {type(layer).__name__} adapters; a {cls.__name__} cannot be added to it"
        )

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def adapter_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter) of one adapter, or of all adapters when ``name`` is None."""
        raise NotImplementedError

    def b_side_params(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """The part of :meth:`adapter_params` that is the output ("B") side of a pair (:attr:`b_side`)."""
        b = {id(p) for store in self.b_side for p in getattr(self, store).values()}
        return ((local, p) for local, p in self.adapter_params(name) if id(p) in b)

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (inference only)."""
        raise NotImplementedError

    def unmerge(self, name: str) -> None:
        raise NotImplementedError

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter tensors as PEFT stores them, keyed by the suffix after the module path."""
        raise NotImplementedError

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Inverse of :meth:`peft_tensors`; shape errors name ``where`` and the tensor."""
        raise NotImplementedError

    # --- shared helpers -------------------------------------------------------------------
    def selection(self) -> Selection:
        """Which adapters run on which rows of the current call."""
        if self.installed_selection is not None:  # inside a decoder block: no ContextVar read
            return self.installed_selection
        ctx = current_context()
        return EVERYWHERE if ctx is None else ctx.selection(token_rows())

    def running(self) -> list[str]:
        """Adapters that may run in this forward (unmerged, not disabled)."""
        if self.disabled:
            return []
        wanted = self.selection().names
        if wanted is not None:
            return [n for n in self.adapter_names if n in wanted and n not in self.merged]
        return [n for n in self.active if n not in self.merged]

    def sample_mask(self, name: str) -> torch.Tensor | None:
        """(B,) bool mask of samples that use ``name``, or None when all samples do."""
        return self.selection().sample_mask(name)

    def token_mask(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Mask broadcastable to ``x`` (B, T, ...) or (N, ...) selecting tokens of ``name``'s samples."""
        selection = self.selection()
        samples = selection.sample_mask(name)
        if samples is None:
            return None
        if x.dim() >= 3 and x.shape[0] == selection.batch_size:
            return samples.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        per_token = samples[selection.sample_of_row]
        return per_token.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class TensorStore(nn.Module):
    """Named tensors that follow ``.to()`` but are not parameters (PiSSA init, DoRA merge factors,
    AdaLoRA rank masks)."""

    def put(self, key: str, value: torch.Tensor, *, persistent: bool = True) -> None:
        self.register_buffer(key, value, persistent=persistent)

    def get(self, key: str) -> torch.Tensor | None:
        return self._buffers.get(key)

    def pop(self, key: str) -> torch.Tensor | None:
        self._non_persistent_buffers_set.discard(key)
        return self._buffers.pop(key, None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def layers_holding(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    """(path, layer) of every adapter layer holding adapter ``name``; an error naming the adapters when none does."""
    layers = [(p, layer) for p, layer in adapter_layers(model) if name in layer.adapter_names]
    if not layers:
        known = sorted({n for _, layer in adapter_layers(model) for n in layer.adapter_names})
        raise AdapterError(f"no adapter named '{name}' in this model (adapters: {', '.join(known) or 'none'})")
    return layers


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model only, inside the block."""
    layers = [m for _, m in adapter_layers(model)]
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m.disabled = p


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    for _, m in adapter_layers(model):
        m.active = [n for n in names if n in m.adapter_names]


def install_selection_hooks(model: nn.Module) -> None:
    """Give ``model`` (once) the hooks that set the adapter context around each of its forwards
    (:func:`~.context.install_hooks`), and hooks on each of its decoder blocks that give the block's
    adapter layers the forward's selection before the block's forward runs and take it back after
    (even when it raises)."""
    if adapter_state(model).hooked:
        return
    install_hooks(model)
    for block in model.modules():
        if isinstance(block, DecoderLayer):
            block.register_forward_pre_hook(_hand_selection)
            block.register_forward_hook(_take_selection, always_call=True)


@contextlib.contextmanager
def selection_handed(module: nn.Module) -> Iterator[None]:
    """Inside the block, the adapter layers in ``module`` hold the current selection (the adapter
    context's, else every active adapter on every row) instead of reading the context: what a
    decoder block's hooks do, for compiling a module that is not a decoder block (one MoE block)."""
    _hand_selection(module, ())
    try:
        yield
    finally:
        _take_selection(module, (), None)


def _hand_selection(block: nn.Module, args: tuple) -> None:  # noqa: ARG001 - the hook's signature
    ctx = current_context()
    selection = EVERYWHERE if ctx is None else ctx.selection()  # a block runs on every token in batch order
    for _, layer in adapter_layers(block):
        layer.installed_selection = selection


def _take_selection(block: nn.Module, args: tuple, output) -> None:  # noqa: ARG001 - the hook's signature
    for _, layer in adapter_layers(block):
        layer.installed_selection = None
