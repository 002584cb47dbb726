"""Typed configuration: LoRA options and the training run file, with YAML in and out.

Every config is a small keyword-only dataclass. Its ``__post_init__`` first checks each field
against its type annotation (so ``LoraConfig(r="8")`` fails as loudly as a bad YAML file), then
runs the section's ``validate()`` for ranges and cross-field rules. :func:`from_dict` builds any
of these dataclasses, nested ones included, from a plain mapping and rejects unknown keys with a
"did you mean" hint.

A run file looks like::

    model: {path: ./tiny-moe, dtype: bf16}
    adapter: {r: 16, alpha: 32, target_modules: [q_proj, v_proj, experts]}
    data: {train: data/train.jsonl, max_length: 1024, packing: true}
    optim: {lr: 2e-4, max_steps: 100, batch_size: 4}
    checkpoint: {output_dir: runs/demo}

The adapter is written either as one ``adapter:`` mapping or as an ``adapters:`` list (several
adapters trained at once); both become :attr:`TrainConfig.adapters`. LoRA options sit directly in
the adapter mapping (flattened, no ``lora:`` level); ``method: dora`` turns on DoRA.

Paths: a relative path written in the config file (``model.path``, ``data.train``, ``data.eval``,
``data.tokenizer``, ``checkpoint.output_dir``) resolves against the folder holding that file, so a
run file works from any current directory. A relative path given as a command-line override
resolves against the current directory, like any other command-line argument.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from moetune.errors import ConfigError, did_you_mean

T = TypeVar("T")
Key = tuple[str | int, ...]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_PATH = {"path": True}
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ConfigFieldError(ConfigError):
    """A ConfigError about one key; its key path grows a prefix as it leaves each nested section.

    ``template`` holds ``{key}`` where the dotted key goes, e.g. ``"{key} must be >= 1, got 0"``.
    """

    def __init__(self, template: str, path: Key = ()) -> None:
        super().__init__(template)
        self.template = template
        self.path: Key = tuple(path)

    def prefixed(self, key: str | int) -> ConfigFieldError:
        self.path = (key, *self.path)
        return self

    def __str__(self) -> str:
        return self.template.replace("{key}", dotted(self.path), 1)


def dotted(path: Key) -> str:
    """Format a key path the way users write it: ``("adapters", 0, "r")`` -> ``adapters[0].r``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _show(value: Any) -> str:
    """Show a value as YAML would spell it, shortened for one-line messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """Say in words which values a type annotation allows."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(_show(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {_plural(args[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "null" if tp is type(None) else getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    names = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return names.get(tp, "mappings" if dataclasses.is_dataclass(tp) else f"({_describe(tp)})")


def _mismatch(value: Any, tp: Any, hint: str = "") -> ConfigFieldError:
    return ConfigFieldError(f"{{key}}: expected {_describe(tp)}, got {_show(value)}{hint}")


def _convert(value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp`` and return it normalised (int -> float, list -> tuple).

    Raises:
        ConfigFieldError: with a path relative to ``value`` when it does not fit.
    """
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, args)
    if origin is Literal:
        if any(value == arm and type(value) is type(arm) for arm in args):
            return value
        hint = did_you_mean(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise _mismatch(value, tp, hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise _mismatch(value, tp)
        items = [_convert_child(i, item, args[0]) for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _build(tp, value)
        raise _mismatch(value, tp)
    return _convert_scalar(value, tp)


def _convert_child(index: int, value: Any, tp: Any) -> Any:
    try:
        return _convert(value, tp)
    except ConfigFieldError as err:
        raise err.prefixed(index) from None


def _convert_union(value: Any, tp: Any, arms: tuple[Any, ...]) -> Any:
    deep: ConfigFieldError | None = None
    for arm in arms:
        try:
            return _convert(value, arm)
        except ConfigFieldError as err:
            # An error inside a list or mapping means the value had that arm's shape: report it.
            deep = deep or (err if err.path else None)
    raise deep or _mismatch(value, tp)


def _convert_scalar(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    if tp is type(None) and value is None:
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is float:
        # PyYAML reads `1e-4` (no dot) as a string, so number-shaped strings count as numbers.
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value)
        if number is not None and math.isfinite(number):
            return float(number)
        if number is not None:
            raise ConfigFieldError(f"{{key}}: expected a finite number, got {_show(value)}")
    if tp not in (bool, int, str, float, type(None)):
        raise TypeError(f"unsupported config annotation {tp!r}")
    raise _mismatch(value, tp)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def check_types(obj: Any) -> None:
    """Check every field of a config dataclass against its annotation, normalising in place.

    Raises:
        ConfigError: naming the field, the value and what the annotation allows.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        try:
            value = _convert(getattr(obj, f.name), hints[f.name])
        except ConfigFieldError as err:
            raise err.prefixed(f.name) from None
        object.__setattr__(obj, f.name, value)


def _require(ok: bool, name: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigFieldError(f"{{key}} must be {what}, got {_show(value)}", (name,))


def _build(cls: type[T], data: dict[Any, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = did_you_mean(str(key), fields) or f" (allowed: {', '.join(fields)})"
            raise ConfigFieldError(f"unknown key '{{key}}'{hint}", (str(key),))
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ConfigFieldError(f"missing required key '{{key}}' ({_describe(_hints(cls)[name])})", (name,))
    return cls(**data)


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build config dataclass ``cls`` (nested sections included) from a plain mapping.

    Args:
        cls: a config dataclass, e.g. :class:`LoraConfig` or :class:`TrainConfig`.
        data: the mapping, typically parsed from YAML or JSON.
        where: the source named in error messages, usually the file name.

    Raises:
        ConfigError: for an unknown or missing key, a wrong type or a value out of range,
            naming ``where`` and the dotted key.
    """
    try:
        if not isinstance(data, dict):
            raise ConfigFieldError(f"expected a mapping of {cls.__name__} keys, got {_show(data)}")
        return _build(cls, data)
    except ConfigFieldError as err:
        raise ConfigError(f"{where}: {err}") from None


def to_plain(obj: Any) -> Any:
    """Turn a config dataclass into plain dicts and lists (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        first = getattr(obj, "dump_first", ())
        names = [*first, *(f.name for f in dataclasses.fields(obj) if f.name not in first)]
        return {name: to_plain(getattr(obj, name)) for name in names}
    if isinstance(obj, (list, tuple)):
        return [to_plain(item) for item in obj]
    return obj


class ConfigSection:
    """Base of every config dataclass: type-check all fields, then run :meth:`validate`."""

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks; raise ConfigError naming the field (override)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, the inverse of :func:`from_dict`."""
        return to_plain(self)


MIXTURE_KINDS = ("mixlora", "loramoe", "mola")
ROUTINGS = ("top_k", "top_p", "switch", "dense")


@dataclass(kw_only=True)
class MixtureConfig(ConfigSection):
    """A mixture of LoRA experts (MixLoRA and relatives); see docs/mixlora.md.

    Attributes:
        kind: where the routers sit. ``mixlora``: one router per dense SwiGLU FFN (dense models'
            ``mlp``, MoE models' dense layers and shared experts) choosing among E copies of the
            frozen FFN, each with its own LoRA on the targeted gate/up/down projections;
            ``loramoe``: a router inside each targeted FFN projection; ``mola``: a router inside
            every targeted linear, attention included. Other targets get a plain LoRA.
            Default (null): from the adapter's ``method``, else ``mixlora``.
        num_experts: LoRA experts per router; a list gives one count per decoder layer.
        routing: ``top_k``; ``top_p`` (dynamic: the fewest experts whose probabilities reach
            ``top_p``); ``switch`` (top-1 with a capacity; ``mixlora`` only); ``dense`` (every
            expert, weighted by its probability). Default (null): ``dense`` for ``loramoe``,
            ``top_k`` otherwise.
        top_k: experts per token (``top_k``).
        top_p: probability mass to reach (``top_p``).
        top_p_renormalize: rescale the chosen experts' weights to sum 1 (MoE-PEFT does not).
        capacity_factor: ``switch``: an expert takes at most ``ceil(factor * tokens / E)`` of
            the tokens of a forward (each adapter counts its own tokens).
        expert_capacity: ``switch``: instead, at most this many tokens per sequence (MoE-PEFT).
        router_aux_loss_coef: weight c of the load-balancing loss ``c * E * sum_e f_e P_e``.
        router_z_loss_coef: ``switch``: weight of the router z-loss ``mean(logsumexp^2)``.
        jitter_noise: in training, the router input is multiplied by ``U(1 - j, 1 + j)``.
        router_init_std: routers start at ``N(0, std)``.
        expert_r, expert_alpha, expert_dropout: LoRA options of the experts, when they differ
            from the adapter's (which the non-mixture targets, e.g. attention, use).
    """

    kind: Literal["mixlora", "loramoe", "mola"] | None = None
    num_experts: int | list[int] = 8
    routing: Literal["top_k", "top_p", "switch", "dense"] | None = None
    top_k: int = 2
    top_p: float = 0.8
    top_p_renormalize: bool = True
    capacity_factor: float = 1.25
    expert_capacity: int | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    jitter_noise: float = 0.0
    router_init_std: float = 0.02
    expert_r: int | None = None
    expert_alpha: float | None = None
    expert_dropout: float | None = None

    def validate(self) -> None:
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        _require(len(counts) > 0 and min(counts) >= 1, "num_experts", "an integer >= 1 or a non-empty list of them", self.num_experts)
        _require(1 <= self.top_k <= min(counts), "top_k", f"in [1, num_experts = {min(counts)}]", self.top_k)
        _require(0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        _require(self.capacity_factor > 0, "capacity_factor", "a number > 0", self.capacity_factor)
        _require(self.expert_capacity is None or self.expert_capacity >= 1, "expert_capacity", "an integer >= 1 or null", self.expert_capacity)
        _require(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "a number >= 0", self.router_aux_loss_coef)
        _require(self.router_z_loss_coef >= 0, "router_z_loss_coef", "a number >= 0", self.router_z_loss_coef)
        _require(0 <= self.jitter_noise < 1, "jitter_noise", "a number in [0, 1)", self.jitter_noise)
        _require(self.router_init_std > 0, "router_init_std", "a number > 0", self.router_init_std)
        _require(self.expert_r is None or self.expert_r >= 1, "expert_r", "an integer >= 1 or null", self.expert_r)
        _require(self.expert_alpha is None or self.expert_alpha > 0, "expert_alpha", "a number > 0 or null", self.expert_alpha)
        drop = self.expert_dropout
        _require(drop is None or 0 <= drop < 1, "expert_dropout", "a number in [0, 1) or null", drop)
        if self.kind is not None:
            self.resolve(self.kind)

    def resolve(self, kind: str) -> None:
        """Fix ``kind`` and the default ``routing``; check that the routing suits the kind."""
        self.kind = kind
        self.routing = self.routing or ("dense" if kind == "loramoe" else "top_k")
        _require(self.routing != "switch" or kind == "mixlora", "routing", "top_k, top_p or dense for kind " + kind, self.routing)

    def experts_at(self, layer: int | None) -> int:
        """Experts of a router in decoder layer ``layer`` (None: outside the layers)."""
        if not isinstance(self.num_experts, list):
            return self.num_experts
        if layer is None or layer >= len(self.num_experts):
            raise ConfigFieldError(f"{{key}} lists {len(self.num_experts)} counts, one per decoder layer, but a "
                                   f"router is needed in layer {layer}", ("num_experts",))
        return self.num_experts[layer]


@dataclass(kw_only=True)
class AdaLoraOptions(ConfigSection):
    """AdaLoRA (Zhang et al., ICLR 2023; PEFT's ``AdaLoraConfig``): SVD-form adapters whose total
    rank shrinks from ``init_r`` to ``target_r`` per adapted matrix on average; see
    :mod:`moetune.peft.adalora`.

    Attributes:
        init_r: starting rank of every adapted matrix (each routed expert's projection counts as
            one); default (null): the adapter's ``r``.
        target_r: the final budget is ``target_r`` times the number of adapted matrices.
        tinit: steps at full rank before the budget starts to shrink.
        tfinal: last steps at the final budget (the pattern is fixed at ``total_step - tfinal``).
        delta_t: steps between two re-allocations while the budget shrinks (PEFT's ``deltaT``).
        beta1, beta2: EMA factors of the sensitivity and of its uncertainty.
        orth_reg_weight: weight of ``mean ||P P^T - I||_F + ||Q^T Q - I||_F`` added to the loss.
        total_step: steps of the schedule; default (null): the run's ``optim.max_steps``.
    """

    init_r: int | None = None
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def validate(self) -> None:
        _require(self.init_r is None or self.init_r >= 1, "init_r", "an integer >= 1 or null", self.init_r)
        _require(self.target_r >= 1, "target_r", "an integer >= 1", self.target_r)
        _require(self.init_r is None or self.target_r <= self.init_r, "target_r", f"<= init_r = {self.init_r}", self.target_r)
        _require(self.tinit >= 0, "tinit", "an integer >= 0", self.tinit)
        _require(self.tfinal >= 0, "tfinal", "an integer >= 0", self.tfinal)
        _require(self.delta_t >= 1, "delta_t", "an integer >= 1", self.delta_t)
        _require(0 < self.beta1 < 1, "beta1", "a number in (0, 1)", self.beta1)
        _require(0 < self.beta2 < 1, "beta2", "a number in (0, 1)", self.beta2)
        _require(self.orth_reg_weight >= 0, "orth_reg_weight", "a number >= 0", self.orth_reg_weight)
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """The budget must have steps to shrink in: ``tinit < total_step - tfinal`` (as PEFT)."""
        _require(total_step >= 1, "total_step", "an integer >= 1", total_step)
        if self.tinit >= total_step - self.tfinal:
            raise ConfigFieldError(f"{{key}}: tinit ({self.tinit}) + tfinal ({self.tfinal}) leave no step of the "
                                   f"{total_step} to shrink the rank budget in; lower them or raise total_step",
                                   ("total_step",))


@dataclass(kw_only=True)
class LoraConfig(ConfigSection):
    """Options for one LoRA adapter (public API ``moetune.LoraConfig``).

    Attributes:
        r: rank of the low-rank update.
        alpha: scale numerator; the update is multiplied by :attr:`scaling`.
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: module-name suffixes to adapt (``q_proj``, ``experts``,
            ``experts.down_proj`` ...) or the string ``"all-linear"``. Left empty when
            ``target_regex`` is given.
        target_regex: a regular expression matched (``re.fullmatch``) against full module
            names, used instead of ``target_modules``.
        init: initialisation of A (B starts at zero, except for PiSSA).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: add DoRA's trainable magnitude vector.
        layers_to_transform: decoder-layer indices to adapt; None adapts every layer.
        expert_rank: ``per_expert`` gives each routed expert its own A and B; ``shared`` shares
            one pair across the experts of a layer.
        bias: only ``"none"`` (no trainable bias) is supported.
        mixture: make the adapter a mixture of LoRA experts (MixLoRA, LoRAMoE, MoLA); None is a
            plain LoRA (see :class:`MixtureConfig`).
        adalora: make the adapter an AdaLoRA (SVD form, adaptive rank); its ``init_r`` is ``r``
            (see :class:`AdaLoraOptions`).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    target_regex: str | None = None
    init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: list[int] | None = None
    expert_rank: Literal["per_expert", "shared"] = "per_expert"
    bias: Literal["none"] = "none"
    mixture: MixtureConfig | None = None
    adalora: AdaLoraOptions | None = None

    @property
    def scaling(self) -> float:
        """The factor applied to ``B @ A x``."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def validate(self) -> None:
        _require(self.r >= 1, "r", "an integer >= 1", self.r)
        _require(self.alpha > 0, "alpha", "a number > 0", self.alpha)
        _require(0 <= self.dropout < 1, "dropout", "a number in [0, 1)", self.dropout)
        self._validate_targets()
        layers = self.layers_to_transform
        if layers is not None:
            _require(len(layers) > 0, "layers_to_transform", "a non-empty list or null", layers)
            _require(min(layers) >= 0, "layers_to_transform", "layer indices >= 0", layers)
            _require(len(set(layers)) == len(layers), "layers_to_transform", "without repeats", layers)
        if self.mixture is not None:
            self._validate_mixture()
        if self.adalora is not None:
            self._validate_adalora()

    def _validate_adalora(self) -> None:
        ada = self.adalora
        if ada.init_r is not None and ada.init_r != self.r:
            _require(self.r == 8, "r", f"left out or equal to adalora.init_r = {ada.init_r}", self.r)  # 8: not given
            self.r = ada.init_r
        ada.init_r = self.r
        _require(ada.target_r <= self.r, "adalora.target_r", f"<= the initial rank r = {self.r}", ada.target_r)
        for key, off in (("use_dora", not self.use_dora), ("use_rslora", not self.use_rslora), ("mixture", self.mixture is None)):
            _require(off, key, "off for an AdaLoRA adapter (PEFT's AdaLoRA has no such variant)", getattr(self, key))
        _require(self.init != "pissa", "init", "kaiming or gaussian for AdaLoRA (its init is PEFT's: P, Q ~ N(0, 0.02), Lambda = 0)", self.init)

    def _validate_mixture(self) -> None:
        try:
            self.mixture.resolve(self.mixture.kind or "mixlora")
        except ConfigFieldError as err:
            raise err.prefixed("mixture") from None
        _require(self.init != "pissa", "init", "kaiming or gaussian for a mixture of experts", self.init)
        kind = self.mixture.kind
        _require(not self.use_dora or kind == "mixlora", "use_dora", f"false for mixture kind {kind} (DoRA experts: mixlora)", self.use_dora)

    def _validate_targets(self) -> None:
        targets, regex = self.target_modules, self.target_regex
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as err:
                raise ConfigFieldError(f"{{key}} is not a valid regular expression ({err}): {regex!r}",
                                  ("target_regex",)) from None
            # The default list stands for "not given", so a regex alone replaces it.
            if targets == list(DEFAULT_TARGETS):
                self.target_modules = targets = []
            _require(targets == [], "target_modules", "left out when target_regex is set", targets)
            return
        if isinstance(targets, str):
            hint = " (write a list, e.g. [q_proj])" if targets != "all-linear" else ""
            _require(targets == "all-linear", "target_modules", f"a list of names or 'all-linear'{hint}",
                     targets)
            return
        _require(len(targets) > 0, "target_modules", "a non-empty list (or set target_regex)", targets)
        _require(all(t.strip() for t in targets), "target_modules", "non-empty names", targets)
        _require(len(set(targets)) == len(targets), "target_modules", "without repeats", targets)


METHOD_KINDS = {"mixlora": "mixlora", "mixdora": "mixlora", "loramoe": "loramoe", "mola": "mola"}


@dataclass(kw_only=True)
class AdapterSection(LoraConfig):
    """One adapter in a run file: a name, a method, the LoRA options (flattened) and, when several
    adapters train at once, what this one does differently from the run's defaults.

    Attributes:
        name: adapter name (letters, digits, ``_``, ``-``); also its folder name when saved.
        method: ``lora``; ``dora`` (same as ``use_dora: true``); ``mixlora`` / ``mixdora``
            (MixLoRA with LoRA / DoRA experts), ``loramoe``, ``mola`` (mixtures of LoRA experts,
            options in ``mixture``); ``adalora`` (adaptive-rank SVD form, options in ``adalora``).
        path: start from the adapter folder here (PEFT layout) instead of a new adapter; its
            rank, alpha and targets come from the folder, not from this mapping.
        frozen: with ``path``: keep that adapter active in every forward but never train or save
            it, so the run trains the other adapters on top of it (progressive training).
        data: this adapter's own data (keys not given come from the run's ``data``).
        optim: this adapter's own learning rate, schedule, steps and batch size.
        output_dir: where its adapter folder goes (default ``<checkpoint.output_dir>/adapter``
            for one adapter, ``.../adapter-<name>`` for several).
    """

    name: str = "default"
    method: Literal["lora", "dora", "mixlora", "mixdora", "loramoe", "mola", "adalora"] = "lora"
    path: str | None = field(default=None, metadata=_PATH)
    frozen: bool = False
    data: DataOverride | None = None
    optim: OptimOverride | None = None
    output_dir: str | None = field(default=None, metadata=_PATH)
    dump_first: ClassVar[tuple[str, ...]] = ("name", "method")

    def validate(self) -> None:
        kind = METHOD_KINDS.get(self.method)
        if kind is not None:
            self.mixture = self.mixture or MixtureConfig()
            if self.mixture.kind not in (None, kind):
                raise ConfigFieldError(f"{{key}}: {self.mixture.kind} contradicts method: {self.method}", ("mixture", "kind"))
            self.mixture.kind = kind
        elif self.mixture is not None:
            raise ConfigFieldError("{key} needs method mixlora, mixdora, loramoe or mola, got method: " + self.method, ("mixture",))
        dora = self.method in ("dora", "mixdora")
        if self.use_dora and not dora:
            better = "dora" if kind is None else "mixdora (MixLoRA with DoRA experts)"
            raise ConfigFieldError(f"{{key}}: true contradicts method: {self.method} (write method: {better})", ("use_dora",))
        self.use_dora = dora
        if self.method == "adalora":
            self.adalora = self.adalora or AdaLoraOptions()
        elif self.adalora is not None:
            raise ConfigFieldError("{key} needs method: adalora, got method: " + self.method, ("adalora",))
        super().validate()
        _require(bool(_ADAPTER_NAME.fullmatch(self.name)), "name", "letters, digits, '_' or '-'", self.name)
        _require(not self.frozen or self.path is not None, "frozen", "false unless path names the adapter folder to keep", self.frozen)

    def to_lora_config(self) -> LoraConfig:
        """The LoRA options alone, as the peft layer takes them."""
        names = [f.name for f in dataclasses.fields(LoraConfig)]
        return LoraConfig(**{name: getattr(self, name) for name in names})


@dataclass(kw_only=True)
class ModelSection(ConfigSection):
    """The frozen base model: a local Hugging Face folder."""

    path: str = field(metadata=_PATH)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    quantize: Literal["nf4"] | None = None

    def validate(self) -> None:
        _require(bool(self.path.strip()), "path", "a model folder", self.path)
        _require(bool(_DEVICE.fullmatch(self.device)), "device", "auto, cpu, mps, cuda or cuda:N", self.device)


@dataclass(kw_only=True)
class DataSection(ConfigSection):
    """Training data: JSONL files, tokenizer, sequence length and packing.

    Attributes:
        train: JSONL file of training rows.
        eval: JSONL file of evaluation rows; or use ``val_fraction``, not both.
        format: row shape; ``auto`` detects it per file.
        tokenizer: ``byte`` (built-in byte tokenizer) or a folder with ``tokenizer.json``.
        max_length: tokens per example (longer ones are truncated) and per packed row.
        packing: pack several examples into each row of ``max_length`` tokens.
        train_on_prompt: put loss on prompt tokens too, not only on responses.
        val_fraction: fraction of ``train`` rows held out for evaluation, in [0, 1).
        skip_bad_rows: skip and count malformed rows instead of failing.
        seed: seed of the validation split.
    """

    train: str = field(metadata=_PATH)
    eval: str | None = field(default=None, metadata=_PATH)
    format: Literal["auto", "instruction", "chat", "text"] = "auto"
    tokenizer: str = field(default="byte", metadata={"path": True, "keep": ("byte",)})
    max_length: int = 512
    packing: bool = False
    train_on_prompt: bool = False
    val_fraction: float = 0.0
    skip_bad_rows: bool = False
    seed: int = 0

    def validate(self) -> None:
        _require(self.max_length >= 2, "max_length", "an integer >= 2", self.max_length)
        _require(0 <= self.val_fraction < 1, "val_fraction", "a number in [0, 1)", self.val_fraction)
        if self.eval is not None and self.val_fraction > 0:
            raise ConfigFieldError("{key}: give either eval or val_fraction, not both", ("val_fraction",))


_TEACHER = re.compile(r"base|adapter:[A-Za-z0-9_-]+|file:.+")


@dataclass(kw_only=True)
class DistillSection(ConfigSection):
    """Distillation: ``loss = CE + weight * T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over
    the tokens that carry a label (teacher logits t, student logits s); see
    :mod:`moetune.train.objectives`.

    Attributes:
        teacher: ``base`` (the model with every adapter off); ``adapter:<name>`` (the base with
            only adapter ``name``: a ``frozen`` adapter of the run, which then does not run in
            the student's forward); ``file:<path>`` (logits saved with
            :func:`moetune.train.objectives.save_teacher_logits`, a relative path from the
            current directory).
        weight: factor on the distillation term.
        temperature: T, softening both distributions.
    """

    teacher: str = "base"
    weight: float = 1.0
    temperature: float = 1.0

    def validate(self) -> None:
        _require(bool(_TEACHER.fullmatch(self.teacher)), "teacher", "base, adapter:<name> or file:<path>", self.teacher)
        _require(self.weight >= 0, "weight", "a number >= 0", self.weight)
        _require(self.temperature > 0, "temperature", "a number > 0", self.temperature)

    @property
    def kind(self) -> str:
        return self.teacher.partition(":")[0]

    @property
    def target(self) -> str:
        """The adapter name or file path after ``adapter:`` / ``file:`` ("" for base)."""
        return self.teacher.partition(":")[2]


@dataclass(kw_only=True)
class OptimSection(ConfigSection):
    """Optimizer (AdamW), schedule, batch size and step count.

    Attributes:
        loraplus_lr_ratio: LoRA+; B matrices get ``lr * ratio``. None turns it off.
        batch_size: examples (or packed rows) per micro-batch on each device.
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: gradient clipping threshold; None turns clipping off.
        aux_loss_coef: weight of the router load-balancing loss added to the LM loss.
        distill: add a distillation term towards a teacher (see :class:`DistillSection`).
        router_bias_update_speed: DeepSeek-V3 aux-loss-free balancing: after each optimizer step
            every router's ``e_score_correction_bias`` moves by this step toward equal expert
            load (0 = off; DeepSeek-V3 used 1e-3). The biases are base-model state: they are
            kept in checkpoints and written to ``router_biases.safetensors`` in the run folder.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    loraplus_lr_ratio: float | None = None
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    max_steps: int
    batch_size: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    aux_loss_coef: float = 0.0
    activation_checkpointing: bool = False
    router_bias_update_speed: float = 0.0
    distill: DistillSection | None = None

    def validate(self) -> None:
        _require(self.lr > 0, "lr", "a number > 0", self.lr)
        _require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        _require(all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)", list(self.betas))
        _require(self.eps > 0, "eps", "a number > 0", self.eps)
        ratio = self.loraplus_lr_ratio
        _require(ratio is None or ratio > 0, "loraplus_lr_ratio", "a number > 0 or null", ratio)
        _require(self.max_steps >= 1, "max_steps", "an integer >= 1", self.max_steps)
        _require(0 <= self.warmup_steps <= self.max_steps, "warmup_steps", "in [0, max_steps]",
                 self.warmup_steps)
        _require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        _require(self.grad_accum >= 1, "grad_accum", "an integer >= 1", self.grad_accum)
        _require(self.router_bias_update_speed >= 0, "router_bias_update_speed", "a number >= 0", self.router_bias_update_speed)
        norm = self.max_grad_norm
        _require(norm is None or norm > 0, "max_grad_norm", "a number > 0 or null", norm)
        _require(self.aux_loss_coef >= 0, "aux_loss_coef", "a number >= 0", self.aux_loss_coef)


@dataclass(kw_only=True)
class DataOverride(ConfigSection):
    """One adapter's own ``data`` keys; a key left out (null) comes from the run's ``data``."""

    train: str | None = field(default=None, metadata=_PATH)
    eval: str | None = field(default=None, metadata=_PATH)
    format: Literal["auto", "instruction", "chat", "text"] | None = None
    max_length: int | None = None
    packing: bool | None = None
    train_on_prompt: bool | None = None
    val_fraction: float | None = None
    skip_bad_rows: bool | None = None
    seed: int | None = None


@dataclass(kw_only=True)
class OptimOverride(ConfigSection):
    """One adapter's own ``optim`` keys; a key left out (null) comes from the run's ``optim``."""

    lr: float | None = None
    weight_decay: float | None = None
    lr_schedule: Literal["cosine", "linear", "constant"] | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None


def _merged(base: T, override: ConfigSection | None, key: Key) -> T:
    """``base`` with the non-null keys of ``override``, validated; errors name ``key``."""
    if override is None:
        return base
    given = {f.name: getattr(override, f.name) for f in dataclasses.fields(override) if getattr(override, f.name) is not None}
    if isinstance(base, DataSection) and "train" in given and "eval" not in given:
        given["eval"] = None  # another train file does not inherit the run's eval file
    try:
        return dataclasses.replace(base, **given)
    except ConfigFieldError as err:
        err.path = (*key, *err.path)
        raise


@dataclass(kw_only=True)
class CheckpointSection(ConfigSection):
    """Where and how often to save. ``save_every: 0`` saves only at the end."""

    output_dir: str = field(metadata=_PATH)
    save_every: int = 0
    keep_last: int = 2

    def validate(self) -> None:
        _require(bool(self.output_dir.strip()), "output_dir", "a folder", self.output_dir)
        _require(self.save_every >= 0, "save_every", "an integer >= 0", self.save_every)
        _require(self.keep_last >= 1, "keep_last", "an integer >= 1", self.keep_last)


@dataclass(kw_only=True)
class LoggingSection(ConfigSection):
    """Logging cadence. ``eval_every: 0`` turns periodic evaluation off."""

    log_every: int = 1
    eval_every: int = 0
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> None:
        _require(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        _require(self.eval_every >= 0, "eval_every", "an integer >= 0", self.eval_every)


@dataclass(kw_only=True)
class DistributedSection(ConfigSection):
    """Multi-process training under ``torchrun`` (ignored by a single process).

    Attributes:
        strategy: ``replicate`` keeps a full model on every rank and all-reduces the adapter
            gradients (small models); ``fsdp`` shards each decoder layer, frozen base and adapters,
            with FSDP2 ``fully_shard``; ``auto`` picks ``fsdp`` on CUDA with more than one rank,
            ``replicate`` otherwise.
        backend: process-group backend; ``auto`` is NCCL on CUDA and gloo on CPU.
        timeout_s: seconds a collective may wait for the other ranks before the run fails.
    """

    strategy: Literal["auto", "fsdp", "replicate"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = 1800

    def validate(self) -> None:
        _require(self.timeout_s >= 1, "timeout_s", "an integer >= 1", self.timeout_s)


@dataclass(kw_only=True)
class TrainConfig(ConfigSection):
    """A whole training run, as read from a run file by :func:`load_train_config`."""

    model: ModelSection
    adapters: list[AdapterSection] = field(default_factory=lambda: [AdapterSection()])
    data: DataSection
    optim: OptimSection
    checkpoint: CheckpointSection
    logging: LoggingSection = field(default_factory=LoggingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    seed: int = 0

    def validate(self) -> None:
        names = [adapter.name for adapter in self.adapters]
        _require(len(names) > 0, "adapters", "a non-empty list", names)
        _require(len(set(names)) == len(names), "adapters", "uniquely named", names)
        for i in range(len(self.adapters)):  # overrides must give valid sections (errors name the adapter)
            self.adapter_data(i), self.adapter_optim(i)
        self._validate_adalora()
        trained = [a.name for a in self.adapters if not a.frozen]
        _require(len(trained) > 0, "adapters", "at least one adapter that is not frozen", names)
        # AdaLoRA's allocation and distillation run in the single-adapter trainer (frozen adapters beside it)
        special = [f"adapters[{i}].adalora" for i, a in enumerate(self.adapters) if a.adalora is not None and not a.frozen]
        special += ["optim.distill"] if self.optim.distill is not None else []
        if special and len(trained) > 1:
            raise ConfigFieldError(f"{{key}}: {', '.join(special)} train one adapter at a time (other adapters may be frozen), "
                                   f"but this run trains {len(trained)}: {', '.join(trained)}", ("adapters",))
        distill = self.optim.distill
        if distill is not None and distill.kind == "adapter":
            frozen = [a.name for a in self.adapters if a.frozen]
            if distill.target not in frozen:
                raise ConfigFieldError(f"{{key}}: adapter '{distill.target}' is not a frozen adapter of this run "
                                       f"(frozen adapters: {', '.join(frozen) or 'none'}; add it with path: and frozen: true)",
                                       ("optim", "distill", "teacher"))

    def _validate_adalora(self) -> None:
        """AdaLoRA's ``total_step`` defaults to the adapter's ``max_steps``; its schedule must fit."""
        for i, adapter in enumerate(self.adapters):
            if adapter.adalora is None:
                continue
            ada = adapter.adalora
            ada.total_step = ada.total_step or self.adapter_optim(i).max_steps
            try:
                ada.check_schedule(ada.total_step)
            except ConfigFieldError as err:
                err.path = ("adapters", i, "adalora", *err.path)
                raise

    def adapter_data(self, index: int) -> DataSection:
        """The ``data`` section adapter ``index`` trains on (its own keys over the run's)."""
        return _merged(self.data, self.adapters[index].data, ("adapters", index, "data"))

    def adapter_optim(self, index: int) -> OptimSection:
        """The ``optim`` section of adapter ``index`` (its own keys over the run's)."""
        return _merged(self.optim, self.adapters[index].optim, ("adapters", index, "optim"))

    def adapter_dir(self, index: int) -> Path:
        """Where adapter ``index``'s folder is written at the end of training."""
        adapter = self.adapters[index]
        if adapter.output_dir:
            return Path(adapter.output_dir)
        leaf = "adapter" if len(self.adapters) == 1 else f"adapter-{adapter.name}"
        return Path(self.checkpoint.output_dir) / leaf

    def single_adapter_view(self) -> TrainConfig:
        """For a one-adapter run: the run with that adapter's data/optim overrides applied."""
        if len(self.adapters) != 1 or (self.adapters[0].data is None and self.adapters[0].optim is None):
            return self
        return dataclasses.replace(self, data=self.adapter_data(0), optim=self.adapter_optim(0))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML otherwise resolves silently (last wins)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, (str, int, float, bool)) and key != "<<":
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None


def _read_run_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with model, data, optim, ...")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_show(raw)}")
    return raw


def _normalise_adapters(raw: dict[str, Any], where: str) -> bool:
    """Turn ``adapter:`` into ``adapters: [..]`` in place; return True for the single-adapter form."""
    if "adapter" in raw and "adapters" in raw:
        raise ConfigError(f"{where}: give either 'adapter' (one) or 'adapters' (a list), not both")
    if "adapters" in raw:
        return False
    single = raw.pop("adapter", None)
    raw["adapters"] = [{} if single is None else single]
    return True


def _section(tp: Any) -> Any:
    """``X | None`` -> ``X`` for an optional section (``mixture``, an adapter's ``optim``), so
    overrides can reach into it."""
    if get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return tp


def _override_key(text: str, raw: dict[str, Any], single: bool) -> Key:
    """Check the key of override ``text`` against the TrainConfig schema; return its path in ``raw``."""
    parts: list[str] = text.partition("=")[0].strip().split(".")
    if parts[0] == "adapter":
        if not single:
            raise ConfigError(f"override '{text}': the config has an 'adapters' list; "
                              f"write adapters.N.{'.'.join(parts[1:])}")
        parts[:1] = ["adapters", "0"]
    cls: Any = TrainConfig
    path: list[str | int] = []
    for depth, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"override '{text}': '{dotted(tuple(path))}' is a value, not a section")
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            hint = did_you_mean(part, names) or f" (allowed: {', '.join(sorted(names))})"
            raise ConfigError(f"unknown key '{dotted((*path, part))}' in override '{text}'{hint}")
        path.append(part)
        tp = _section(_hints(cls)[part])
        cls = tp if dataclasses.is_dataclass(tp) else None
        if get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            index = parts[depth + 1] if depth + 1 < len(parts) else ""
            if not index.isdigit() or int(index) >= len(raw.get(part) or []):
                raise ConfigError(f"override '{text}': '{part}' needs an index below "
                                  f"{len(raw.get(part) or [])}, e.g. {part}.0.<key>")
            parts.pop(depth + 1)
            path.append(int(index))
            cls = get_args(tp)[0]
    return tuple(path)


def _apply_overrides(raw: dict[str, Any], overrides: list[str], single: bool) -> set[Key]:
    """Apply ``key.sub=value`` overrides to ``raw`` in place; return the keys they set."""
    done: set[Key] = set()
    for text in overrides:
        key_text, sep, value_text = text.partition("=")
        if not sep or not key_text.strip():
            raise ConfigError(f"override '{text}': expected key.sub=value, e.g. optim.lr=1e-4")
        key = _override_key(text, raw, single)
        value = _parse_yaml(value_text, f"override '{text}'")
        node: Any = raw
        for depth, part in enumerate(key[:-1]):
            if isinstance(part, str) and node.get(part) is None:
                node[part] = {}
            node = node[part]
            want = list if isinstance(key[depth + 1], int) else dict
            if not isinstance(node, want):
                raise ConfigError(f"override '{text}': '{dotted(key[:depth + 1])}' in the config "
                                  f"is {_show(node)}, not a {'list' if want is list else 'mapping'}")
        node[key[-1]] = value
        done.add(key)
    return done


def _resolve_paths(obj: Any, base: Path, overridden: set[Key], prefix: Key = ()) -> None:
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), (*prefix, f.name)
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, base, overridden, key)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _resolve_paths(item, base, overridden, (*key, index))
        elif f.metadata.get("path") and isinstance(value, str) and value not in f.metadata.get("keep", ()):
            root = Path.cwd() if key in overridden else base
            setattr(obj, f.name, os.path.abspath(root / Path(value).expanduser()))


def load_train_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a run file, apply command-line overrides and validate everything.

    Args:
        path: the YAML run file.
        overrides: ``key.sub=value`` strings; each value is parsed as YAML, so
            ``optim.lr=1e-4``, ``data.packing=true`` and ``adapter.target_modules=[q_proj]`` work.
            ``adapter.<key>`` addresses the single adapter, ``adapters.N.<key>`` one of a list.

    Returns:
        The config, with every relative path made absolute (see the module docstring).

    Raises:
        ConfigError: naming the file (and line, for bad YAML) or the override, and the key.
    """
    path = Path(path)
    raw = _read_run_file(path)
    single = _normalise_adapters(raw, str(path))
    overridden = _apply_overrides(raw, list(overrides), single)
    try:
        config = _build(TrainConfig, raw)
    except ConfigFieldError as err:
        source = "override" if any(err.path[:len(k)] == k for k in overridden) else str(path)
        if single and err.path[:2] == ("adapters", 0):
            err.path = ("adapter", *err.path[2:])  # name the key as the file wrote it
        raise ConfigError(f"{source}: {err}") from None
    _resolve_paths(config, path.parent.absolute(), overridden)
    return config


def dump_config(config: ConfigSection) -> str:
    """The resolved config as YAML (what ``--print-config`` shows); loading it gives it back."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
