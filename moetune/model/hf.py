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
# Mistral 4 checkpoints hold the experts fused, as in memory: every key maps to itself.
PER_EXPERT_RULES["mistral4"] = []
# MiniMax-M2: Mixtral's names, plus the router's correction bias, stored on the MoE block.
PER_EXPERT_RULES["minimax_m2"] = PER_EXPERT_RULES["mixtral"] + [
    ("model.layers.{L}.block_sparse_moe.e_score_correction_bias", _MOE + ".gate.e_score_correction_bias", "all"),
]

# Whole tensors a family's checkpoint stores in another layout than ours, by native name (= checkpoint
# key). gpt-oss keeps its experts transposed, (E, in, out), with gate and up columns interleaved
# (gate_0, up_0, gate_1, ...); ours are (E, out, in) with the gate rows first. The layouts are
# permutations, so both directions are exact.
LAYOUT_RULES: dict[str, list[tuple[str, str]]] = {
    "gpt_oss": [
        (_MOE + ".experts.gate_up_proj", "interleaved_transposed"),
        (_MOE + ".experts.gate_up_proj_bias", "interleaved"),
        (_MOE + ".experts.down_proj", "transposed"),
    ],
}
PER_EXPERT_RULES["gpt_oss"] = []  # fused tensors only (LAYOUT_RULES)

# Checkpoint keys that carry no weights we need (recomputed buffers).
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
# Per family, top-level parts of released checkpoints that we do not build: the multi-token-prediction
# module Qwen3-Next and Qwen3.5 store as mtp.* (transformers skips it the same way).
IGNORED_PREFIXES: dict[str, tuple[str, ...]] = {"qwen3_next": ("mtp.",), "qwen3_5_moe_text": ("mtp.",)}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: native name, expert index (or None) and slice."""

    name: str
    expert: int | None = None
    part: str = "all"
    layout: str | None = None  # a LAYOUT_RULES layout: the checkpoint tensor is the whole native one, permuted


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
        self.layouts = [(_compile(name), layout) for name, layout in LAYOUT_RULES.get(family, [])]

    def layout(self, name: str) -> str | None:
        """The checkpoint layout of native tensor ``name`` when it differs from ours."""
        return next((layout for regex, layout in self.layouts if regex.match(name)), None)

    def skipped(self, key: str) -> bool:
        """True for keys of a skipped layer."""
        m = LAYER_KEY.match(key)
        return m is not None and int(m.group(1)) in self.skipped_layers

    def ignored(self, key: str) -> bool:
        """True for checkpoint keys that map to nothing by design (only asked for unknown keys)."""
        parts = IGNORED_PREFIXES.get(self.family, ())
        return bool(IGNORED_KEYS.match(key)) or self.skipped(key) or key.startswith(parts)

    def target(self, key: str) -> Target:
        layout = self.layout(key)
        if layout is not None:
            return Target(key, layout=layout)
        for regex, _, dst, part in self.rules:
            m = regex.match(key)
            if m:
                expert = int(m.group("e")) if "e" in m.groupdict() else None
                return Target(dst.format(L=m.group("L")), expert, part)
        return Target(key)

    def export(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Checkpoint (key, tensor) pairs for a native tensor, in the layout transformers writes."""
        layout = self.layout(name)
        if layout is not None:
            return [(name, to_checkpoint(tensor, layout))]
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


def interleave(t: torch.Tensor) -> torch.Tensor:
    """(..., 2F) gate columns then up columns -> gate_0, up_0, gate_1, up_1, ..."""
    return t.unflatten(-1, (2, t.shape[-1] // 2)).transpose(-1, -2).flatten(-2)


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave`."""
    return t.unflatten(-1, (t.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


def to_checkpoint(native: torch.Tensor, layout: str) -> torch.Tensor:
    """A native tensor in a :data:`LAYOUT_RULES` checkpoint layout."""
    if layout == "transposed":
        return native.transpose(-1, -2)
    if layout == "interleaved":
        return interleave(native)
    if layout == "interleaved_transposed":  # (E, 2F, D) gate rows first -> (E, D, 2F) interleaved
        return interleave(native.transpose(-1, -2))
    raise ValueError(f"unknown checkpoint layout '{layout}'")


def from_checkpoint(stored: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`to_checkpoint`: a checkpoint tensor in the native layout."""
    if layout == "transposed":
        return stored.transpose(-1, -2)
    if layout == "interleaved":
        return deinterleave(stored)
    if layout == "interleaved_transposed":
        return deinterleave(stored).transpose(-1, -2)
    raise ValueError(f"unknown checkpoint layout '{layout}'")


def checkpoint_shape(native: torch.Tensor, layout: str | None) -> tuple[int, ...]:
    """The shape the checkpoint holds for ``native`` (no data is touched)."""
    if layout is None:
        return tuple(native.shape)
    return tuple(to_checkpoint(torch.empty(native.shape, device="meta"), layout).shape)
