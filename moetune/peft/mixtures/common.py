"""What the mixture layers share: which tokens an adapter routes, router parameters, records,
the expert LoRA scaling, and calling a frozen projection whatever wraps it.

A mixture adapter routes only its own tokens: the real (non-padding) tokens of the samples that
named it (``adapter_names``), or every real token when the forward names no adapters. Its
router therefore never sees padding nor another adapter's samples, and its load-balancing sums
are its own - which is what makes adapters trained together equal to adapters trained alone.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ...config import LoraConfig, MixtureConfig
from ...errors import AdapterError
from ...model.context import token_rows
from ..core.context import current_context
from ..core.layer import AdapterLayer
from ..core.selection import SampleRuns, cat
from ..core.tensors import check_tensors
from .router import MixtureRecord, Route, route


@dataclasses.dataclass(frozen=True)
class ExpertOptions:
    """One mixture adapter's experts and router as its config sets them (``MixtureConfig.expert_*``
    over the adapter's LoRA options), and the fresh parameters every mixture wrapper starts from."""

    num_experts: int
    rank: int
    scaling: float
    dropout: float
    init: str
    router_std: float

    @classmethod
    def of(cls, config: LoraConfig, where: str) -> ExpertOptions:
        """The options of ``config``, which must have a mixture with one expert count (``where`` names the caller)."""
        mix = require_mixture(config, where)
        r = mix.expert_r or config.r
        alpha = mix.expert_alpha or config.alpha
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        dropout = config.dropout if mix.expert_dropout is None else mix.expert_dropout
        return cls(mix.num_experts, r, scaling, dropout, config.init, mix.router_init_std)

    def new_pair(self, d_in: int, d_out: int, device: torch.device) -> tuple[nn.Parameter, nn.Parameter]:
        """A (E, r, in) fp32, initialised like ``nn.Linear`` per expert (kaiming) or N(0, 1/r);
        B (E, out, r) zeros, so every expert starts as the frozen layer."""
        a = torch.empty(self.num_experts, self.rank, d_in, dtype=torch.float32, device=device)
        if self.init == "gaussian":
            nn.init.normal_(a, std=1 / self.rank)
        else:  # per expert = on the (E*r, in) view: fan_in is `in` either way
            nn.init.kaiming_uniform_(a.view(-1, d_in), a=math.sqrt(5))
        b = torch.zeros(self.num_experts, d_out, self.rank, dtype=torch.float32, device=device)
        return nn.Parameter(a), nn.Parameter(b)

    def new_router(self, dim: int, device: torch.device) -> nn.Parameter:
        """Router weight (E, D), fp32, N(0, router_init_std)."""
        return nn.Parameter(torch.randn(self.num_experts, dim, dtype=torch.float32, device=device) * self.router_std)

    def new_dropout(self) -> nn.Module:
        return nn.Dropout(self.dropout) if self.dropout > 0 else nn.Identity()


def base_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen projection's output, without any adapter that wraps it."""
    return module.base_layer(x) if isinstance(module, AdapterLayer) else module(x)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The frozen projection's (out, in) weight (dequantized for a 4-bit base), no grad."""
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    return base.weight.detach()


def routed_rows(layer: AdapterLayer, name: str, n: int, device: torch.device) -> torch.Tensor | None:
    """(N_a,) indices of the rows adapter ``name`` of ``layer`` routes among the ``n`` of this
    call, or None when it routes all of them. Cached per forward for calls on all its tokens."""
    ctx = current_context()
    called_on = token_rows()  # the tokens of a call on some of them (the LM head's loss chunks)
    if ctx is None or (called_on is None and ctx.batch_size * ctx.seq_len != n):
        return None
    key = ("mixture_rows", name, device)
    if called_on is not None or key not in ctx.extras:
        runs = layer.selection().runs
        if ctx.token_mask is None and runs is not None:  # its samples' rows are known on the host: no nonzero
            return _cached(ctx, key, called_on, _rows_of_runs(runs, name, called_on, device))
        samples = layer.sample_mask(name)
        mask = None if samples is None else samples[ctx.sample_of_rows(device)]
        if ctx.token_mask is not None:
            real = ctx.token_mask.to(device).bool()
            real = real if called_on is None else real[called_on.start : called_on.stop]
            mask = real if mask is None else mask & real
        return _cached(ctx, key, called_on, None if mask is None else mask.nonzero().squeeze(1))
    return ctx.extras[key]


def _cached(ctx, key, called_on: range | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    if called_on is None:  # a call on every token: kept for the forward's other calls
        ctx.extras[key] = rows
    return rows


def _rows_of_runs(runs: SampleRuns, name: str, called_on: range | None, device: torch.device) -> torch.Tensor:
    """(N_a,) the call's rows of ``name``'s samples, from the runs of samples (aranges on the device)."""
    slot, at, parts = runs.slot(name), 0, []
    for n, s in runs.segments(called_on):
        if s == slot:
            parts.append(torch.arange(at, at + n, device=device))
        at += n
    return cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _sequence_of(rows: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """(N_a,) sequence of each routed token (for per-sequence capacity), when known."""
    ctx = current_context()
    if ctx is None or (token_rows() is None and ctx.batch_size * ctx.seq_len != n):
        return None
    sample = ctx.sample_of_rows(device)
    return sample if rows is None else sample[rows]


def check_not_stacked(mixtures: list[str], others: bool) -> None:
    """A mixture replaces the layer's output for its tokens, so it cannot be summed with
    another adapter on the same tokens; batches mixing adapters name one per sample."""
    ctx = current_context()
    per_sample = ctx is not None and ctx.adapter_names is not None
    if not per_sample and mixtures and (len(mixtures) > 1 or others):
        raise AdapterError(
            f"mixture adapter(s) {mixtures} cannot run together with other adapters on the same "
            "tokens; activate one adapter, or pass adapter_names (one per sample)"
        )


def route_tokens(
    layer: AdapterLayer, name: str, config: LoraConfig, x: torch.Tensor, rows: torch.Tensor | None, n: int
) -> Route:
    """Route adapter ``name``'s tokens ``x`` (N_a, D) with ``layer.router[name]`` and report the
    routing statistics in the forward's records."""
    sequence = _sequence_of(rows, n, x.device) if config.mixture.expert_capacity else None
    result = route(x, layer.router[name], config.mixture, training=layer.training, sequence=sequence)
    ctx = current_context()
    if ctx is not None:  # written again (not added) if checkpointing recomputes this layer
        mix = config.mixture
        z_coef = mix.router_z_loss_coef if mix.routing == "switch" else 0.0
        ctx.records[(id(layer), name)] = MixtureRecord(
            adapter=name, stats=result.stats, aux_coef=mix.router_aux_loss_coef, z_coef=z_coef
        )
    return result


def refuse_merge(name: str) -> None:
    raise AdapterError(
        f"adapter '{name}' is a mixture of LoRA experts: its router picks experts per token, "
        "so it cannot be folded into the base weights"
    )


def load_own(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy file ``tensors`` into ``own`` (detached views of the parameters), after the one check."""
    check_tensors({k: tuple(v.shape) for k, v in own.items()}, tensors, where, differs=", rank or expert count")
    with torch.no_grad():
        for key, t in own.items():
            t.copy_(tensors[key])


def scatter_rows(out: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """``out`` with rows ``rows`` replaced by ``values`` (all rows when ``rows`` is None)."""
    return values if rows is None else out.index_copy(0, rows, values)


def mixture_config(config: LoraConfig, num_experts: int) -> LoraConfig:
    """``config`` with a fixed expert count (a per-layer list resolved for one module)."""
    return dataclasses.replace(config, mixture=dataclasses.replace(config.mixture, num_experts=num_experts))


def require_mixture(config: LoraConfig, where: str) -> MixtureConfig:
    if config.mixture is None or isinstance(config.mixture.num_experts, list):
        raise AdapterError(f"{where} needs a LoraConfig with a mixture and one expert count")
    return config.mixture


def offsets_with_unused(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The (E,) offsets of a variable route's real experts (``top_p``, ``switch``), the last group
    extended over the unused slots that sort after it (id E) to all ``rows``.

    An unused slot's combine weight is 0, so what the last expert computes on it is dropped from
    the output (times 0) and sends no gradient back: the result is the one that skips those rows,
    without reading on the host how many there are.
    """
    return torch.cat([offsets[:-1], offsets.new_full((1,), rows)])
