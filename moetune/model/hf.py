"""Hugging Face checkpoint folders <-> native modules, through declarative key maps.

Native parameter names equal transformers 5's in-memory names, so most checkpoint keys map to
themselves. The exceptions are expert weights, which transformers 5 still writes per expert
(``...mlp.experts.{e}.gate_proj.weight``; Mixtral: ``...block_sparse_moe.experts.{e}.w1.weight``)
while we hold them fused as 3D tensors; fused checkpoints (``...mlp.experts.gate_up_proj``) are
read as they are. Each rule says which native tensor, which expert, and which slice (gate rows,
up rows, or all) a checkpoint key fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# part: "all" = the whole native tensor (or expert e of it); "gate"/"up" = that half of gate_up_proj.
_MOE = "model.layers.{L}.mlp"
PER_EXPERT_RULES: dict[str, list[tuple[str, str, str]]] = {
    "default": [
        ("model.layers.{L}.mlp.experts.{e}.gate_proj.weight", _MOE + ".experts.gate_up_proj", "gate"),
        ("model.layers.{L}.mlp.experts.{e}.up_proj.weight", _MOE + ".experts.gate_up_proj", "up"),
        ("model.layers.{L}.mlp.experts.{e}.down_proj.weight", _MOE + ".experts.down_proj", "all"),
    ],
    "mixtral": [
        ("model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight", _MOE + ".experts.gate_up_proj", "gate"),
        ("model.layers.{L}.block_sparse_moe.experts.{e}.w3.weight", _MOE + ".experts.gate_up_proj", "up"),
        ("model.layers.{L}.block_sparse_moe.experts.{e}.w2.weight", _MOE + ".experts.down_proj", "all"),
        ("model.layers.{L}.block_sparse_moe.gate.weight", _MOE + ".gate.weight", "all"),
    ],
}
# MiniMax-M2: Mixtral's names, plus the router's correction bias, stored on the MoE block.
PER_EXPERT_RULES["minimax_m2"] = PER_EXPERT_RULES["mixtral"] + [
    ("model.layers.{L}.block_sparse_moe.e_score_correction_bias", _MOE + ".gate.e_score_correction_bias", "all"),
]

# Checkpoint keys that carry no weights we need (recomputed buffers).
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: native name, expert index (or None) and slice."""

    name: str
    expert: int | None = None
    part: str = "all"


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(pattern + "$")


class KeyMap:
    """Maps checkpoint keys to native targets and native tensors back to checkpoint keys."""

    def __init__(self, family: str, *, skipped_layers: range = range(0)) -> None:
        """``skipped_layers``: checkpoint layer indices of modules we do not build (the
        multi-token-prediction layers stored after the decoder layers); their keys map to nothing."""
        self.family = family
        self.skipped_layers = skipped_layers
        self.rules = [
            (_compile(src), src, dst, part)
            for src, dst, part in PER_EXPERT_RULES.get(family, PER_EXPERT_RULES["default"])
        ]

    def skipped(self, key: str) -> bool:
        """True for keys of a skipped layer."""
        m = LAYER_KEY.match(key)
        return m is not None and int(m.group(1)) in self.skipped_layers

    def ignored(self, key: str) -> bool:
        """True for checkpoint keys that map to nothing by design (only asked for unknown keys)."""
        return bool(IGNORED_KEYS.match(key)) or self.skipped(key)

    def target(self, key: str) -> Target:
        for regex, _, dst, part in self.rules:
            m = regex.match(key)
            if m:
                expert = int(m.group("e")) if "e" in m.groupdict() else None
                return Target(dst.format(L=m.group("L")), expert, part)
        return Target(key)

    def export(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Checkpoint (key, tensor) pairs for a native tensor, in the layout transformers writes."""
        out = []
        for regex_src, src, dst, part in self.rules:
            m = _compile(dst).match(name)
            if not m:
                continue
            layer = m.group("L")
            if "{e}" not in src:
                return [(src.format(L=layer), tensor)]
            for e in range(tensor.shape[0]):
                out.append((src.format(L=layer, e=e), slice_part(tensor[e], part)))
        return out or [(name, tensor)]


def slice_part(expert_weight: torch.Tensor, part: str) -> torch.Tensor:
    """gate rows / up rows of one expert's (2F, D) gate_up weight, or the whole tensor."""
    if part == "all":
        return expert_weight
    half = expert_weight.shape[0] // 2
    return expert_weight[:half] if part == "gate" else expert_weight[half:]


def destination(native: torch.Tensor, target: Target) -> torch.Tensor:
    """The view of a native tensor that a checkpoint tensor fills."""
    view = native if target.expert is None else native[target.expert]
    return slice_part(view, target.part)
