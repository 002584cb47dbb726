"""Preference tuning options (``optim.objective`` other than ``sft``, and ``optim.preference``).

The objectives and their options, named as TRL names them (see :mod:`moetune.train.preference_losses`):

- ``dpo``: ``-log sigmoid(beta * (log-ratio(chosen) - log-ratio(rejected)))``, log-ratios against the
  reference (the base with every adapter off).
- ``ipo``: ``(mean log-ratio difference - 1 / (2 beta))^2``, log-ratios averaged over completion tokens.
- ``simpo``: reference-free, ``-log sigmoid(beta * (avg logp(chosen) - avg logp(rejected)) - gamma)``;
  ``label_smoothing`` mixes in the flipped pair's loss.
- ``orpo``: reference-free, the chosen completion's NLL minus ``beta * log sigmoid(log odds ratio)``
  (``beta`` is the paper's lambda).
- ``kto``: unpaired rows with a ``label``; ``desirable_weight`` / ``undesirable_weight`` weigh them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .schema import ConfigFieldError, ConfigSection, require

Objective = Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto"]
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
# TRL's defaults: DPOConfig / KTOConfig beta 0.1, CPOConfig (SimPO) beta 2.0 per the SimPO paper,
# ORPOConfig beta (lambda) 0.1.
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
# TRL uses this router load-balancing weight for MoE policies (router_aux_loss_coef).
PREFERENCE_AUX_LOSS_COEF = 0.001
# Options that belong to some objectives only: giving one to another objective is an error.
ONLY_FOR = {
    "gamma": ("simpo",),
    "label_smoothing": ("simpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "precompute_reference": ("dpo", "ipo", "kto"),
    "reference": ("dpo", "ipo", "kto"),
}


@dataclass(kw_only=True)
class PreferenceSection(ConfigSection):
    """``optim.preference``: the options of the preference objective.

    Attributes:
        beta: temperature of the implicit reward (ORPO: the weight lambda of the odds-ratio term);
            default per objective (dpo, ipo, kto, orpo 0.1; simpo 2.0).
        gamma: SimPO's target reward margin (TRL ``simpo_gamma``).
        label_smoothing: SimPO's probability that a pair's labels are flipped.
        desirable_weight, undesirable_weight: KTO's weights of desirable / undesirable rows.
        precompute_reference: compute the reference log-probs once before training and keep them
            in ``reference_logps.safetensors`` in the run folder, instead of one reference forward
            per step.
        reference: ``base`` (every adapter off) or ``initial``: the trained adapter as it was
            loaded from ``adapter.path`` (e.g. an SFT adapter), kept as a frozen copy beside it,
            as TRL does when it trains an existing adapter.
    """

    beta: float | None = None
    gamma: float = 0.5
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_reference: bool = False
    reference: Literal["base", "initial"] = "base"

    def validate(self) -> None:
        require(self.beta is None or self.beta > 0, "beta", "a number > 0", self.beta)
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "a number in [0, 0.5)", self.label_smoothing)
        for name in ("desirable_weight", "undesirable_weight"):
            require(getattr(self, name) > 0, name, "a number > 0", getattr(self, name))

    def check_for(self, objective: str) -> None:
        """Refuse options that ``objective`` does not use; fill in its default ``beta``."""
        for name, objectives in ONLY_FOR.items():
            if self.given(name) and objective not in objectives:
                raise ConfigFieldError(
                    f"{{key}} is an option of objective {' / '.join(objectives)}, not of {objective}", (name,)
                )
        if self.beta is None:
            self.beta = DEFAULT_BETA[objective]
