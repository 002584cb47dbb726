"""LoRA options (:class:`LoraConfig`, public API ``moetune.LoraConfig``) and the options of its
variants: mixtures of LoRA experts (:class:`MixtureConfig`) and AdaLoRA (:class:`AdaLoraOptions`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from .schema import ConfigFieldError, ConfigSection, require

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
        require(
            len(counts) > 0 and min(counts) >= 1,
            "num_experts",
            "an integer >= 1 or a non-empty list of them",
            self.num_experts,
        )
        require(1 <= self.top_k <= min(counts), "top_k", f"in [1, num_experts = {min(counts)}]", self.top_k)
        require(0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        require(self.capacity_factor > 0, "capacity_factor", "a number > 0", self.capacity_factor)
        require(
            self.expert_capacity is None or self.expert_capacity >= 1,
            "expert_capacity",
            "an integer >= 1 or null",
            self.expert_capacity,
        )
        require(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "a number >= 0", self.router_aux_loss_coef)
        require(self.router_z_loss_coef >= 0, "router_z_loss_coef", "a number >= 0", self.router_z_loss_coef)
        require(0 <= self.jitter_noise < 1, "jitter_noise", "a number in [0, 1)", self.jitter_noise)
        require(self.router_init_std > 0, "router_init_std", "a number > 0", self.router_init_std)
        require(self.expert_r is None or self.expert_r >= 1, "expert_r", "an integer >= 1 or null", self.expert_r)
        require(
            self.expert_alpha is None or self.expert_alpha > 0,
            "expert_alpha",
            "a number > 0 or null",
            self.expert_alpha,
        )
        drop = self.expert_dropout
        require(drop is None or 0 <= drop < 1, "expert_dropout", "a number in [0, 1) or null", drop)
        if self.kind is not None:
            self.resolve(self.kind)

    def resolve(self, kind: str) -> None:
        """Fix ``kind`` and the default ``routing``; check that the routing suits the kind."""
        self.kind = kind
        self.routing = self.routing or ("dense" if kind == "loramoe" else "top_k")
        require(
            self.routing != "switch" or kind == "mixlora",
            "routing",
            "top_k, top_p or dense for kind " + kind,
            self.routing,
        )

    def experts_at(self, layer: int | None) -> int:
        """Experts of a router in decoder layer ``layer`` (None: outside the layers)."""
        if not isinstance(self.num_experts, list):
            return self.num_experts
        if layer is None or layer >= len(self.num_experts):
            raise ConfigFieldError(
                f"{{key}} lists {len(self.num_experts)} counts, one per decoder layer, but a "
                f"router is needed in layer {layer}",
                ("num_experts",),
            )
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
        require(self.init_r is None or self.init_r >= 1, "init_r", "an integer >= 1 or null", self.init_r)
        require(self.target_r >= 1, "target_r", "an integer >= 1", self.target_r)
        require(
            self.init_r is None or self.target_r <= self.init_r, "target_r", f"<= init_r = {self.init_r}", self.target_r
        )
        require(self.tinit >= 0, "tinit", "an integer >= 0", self.tinit)
        require(self.tfinal >= 0, "tfinal", "an integer >= 0", self.tfinal)
        require(self.delta_t >= 1, "delta_t", "an integer >= 1", self.delta_t)
        require(0 < self.beta1 < 1, "beta1", "a number in (0, 1)", self.beta1)
        require(0 < self.beta2 < 1, "beta2", "a number in (0, 1)", self.beta2)
        require(self.orth_reg_weight >= 0, "orth_reg_weight", "a number >= 0", self.orth_reg_weight)
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """The budget must have steps to shrink in: ``tinit < total_step - tfinal`` (as PEFT)."""
        require(total_step >= 1, "total_step", "an integer >= 1", total_step)
        if self.tinit >= total_step - self.tfinal:
            raise ConfigFieldError(
                f"{{key}}: tinit ({self.tinit}) + tfinal ({self.tfinal}) leave no step of the "
                f"{total_step} to shrink the rank budget in; lower them or raise total_step",
                ("total_step",),
            )


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
        require(self.r >= 1, "r", "an integer >= 1", self.r)
        require(self.alpha > 0, "alpha", "a number > 0", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "a number in [0, 1)", self.dropout)
        self._validate_targets()
        layers = self.layers_to_transform
        if layers is not None:
            require(len(layers) > 0, "layers_to_transform", "a non-empty list or null", layers)
            require(min(layers) >= 0, "layers_to_transform", "layer indices >= 0", layers)
            require(len(set(layers)) == len(layers), "layers_to_transform", "without repeats", layers)
        if self.mixture is not None:
            self._validate_mixture()
        if self.adalora is not None:
            self._validate_adalora()

    def _validate_adalora(self) -> None:
        ada = self.adalora
        if ada.init_r is not None and ada.init_r != self.r:
            require(not self.given("r"), "r", f"left out or equal to adalora.init_r = {ada.init_r}", self.r)
            self.r = ada.init_r
        ada.init_r = self.r
        require(ada.target_r <= self.r, "adalora.target_r", f"<= the initial rank r = {self.r}", ada.target_r)
        for key, off in (
            ("use_dora", not self.use_dora),
            ("use_rslora", not self.use_rslora),
            ("mixture", self.mixture is None),
        ):
            require(off, key, "off for an AdaLoRA adapter (PEFT's AdaLoRA has no such variant)", getattr(self, key))
        require(
            self.init != "pissa",
            "init",
            "kaiming or gaussian for AdaLoRA (its init is PEFT's: P, Q ~ N(0, 0.02), Lambda = 0)",
            self.init,
        )

    def _validate_mixture(self) -> None:
        try:
            self.mixture.resolve(self.mixture.kind or "mixlora")
        except ConfigFieldError as err:
            raise err.prefixed("mixture") from None
        require(self.init != "pissa", "init", "kaiming or gaussian for a mixture of experts", self.init)
        kind = self.mixture.kind
        require(
            not self.use_dora or kind == "mixlora",
            "use_dora",
            f"false for mixture kind {kind} (DoRA experts: mixlora)",
            self.use_dora,
        )

    def _validate_targets(self) -> None:
        targets, regex = self.target_modules, self.target_regex
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as err:
                raise ConfigFieldError(
                    f"{{key}} is not a valid regular expression ({err}): {regex!r}", ("target_regex",)
                ) from None
            if not self.given("target_modules"):  # a regex alone replaces the default list
                self.target_modules = targets = []
            require(targets == [], "target_modules", "left out when target_regex is set", targets)
            return
        if isinstance(targets, str):
            hint = " (write a list, e.g. [q_proj])" if targets != "all-linear" else ""
            require(targets == "all-linear", "target_modules", f"a list of names or 'all-linear'{hint}", targets)
            return
        require(len(targets) > 0, "target_modules", "a non-empty list (or set target_regex)", targets)
        require(all(t.strip() for t in targets), "target_modules", "non-empty names", targets)
        require(len(set(targets)) == len(targets), "target_modules", "without repeats", targets)
