"""The per-expert serving layout (what vLLM and SGLang read) of routed-expert adapters.

Routed experts are written as 2D pairs per expert and projection under the names the family's
serving checkpoints use, ``<block>.experts.{e}.<proj>.lora_A.weight`` (r, in) / ``...lora_B.weight``
(out, r): ``mlp.experts.{e}.gate_proj|up_proj|down_proj`` for most families, Mixtral's and
MiniMax-M2's ``block_sparse_moe.experts.{e}.w1|w3|w2`` (:data:`SERVING_EXPERTS`). vLLM names the
LoRA module of expert e ``<module path of its experts>.{e}.<checkpoint name>`` (``get_moe_expert_mapping``
/ ``process_packed_modules_mapping`` in ``vllm/lora/utils.py``) and leaves a tensor under any other
name unused (silently, or refuses the folder), so the names are per family. Linears keep PEFT's keys.

What else the servers need, each checked against their loading code (docs/serving.md):

- every expert has all three projections (vLLM's ``PackedLoRALayerWeights.pack_moe`` asserts
  w1, w2 and w3 per expert): an untargeted projection is written as a zero pair (A = 0, B = 0, at
  the adapter's rank), which adds nothing, and is left out of ``target_modules`` (listed when the
  scaling is folded for SGLang, whose strict loading refuses unlisted tensors);
- a projection whose rank or alpha differs from the adapter-wide values gets ``rank_pattern`` /
  ``alpha_pattern`` entries keyed ``<module path>\\.experts\\.\\d+\\.<proj>`` (PEFT's and vLLM's
  pattern rule: ``re.match(rf"(.*\\.)?({key})$", name)``);
- the folder is marked for servers only (:data:`SERVING_TASK_TYPE`): PEFT maps per-expert names
  onto transformers-5 fused experts differently per family (silently wrong for some), so PEFT
  refuses the folder (``Invalid task type``) rather than loading it; export ``--layout peft`` for PEFT.

Reading (:func:`native_keys`, :func:`load_part`) takes any family's serving names back to the fused
experts, drops zero pairs of untargeted projections, and needs no ``moetune_adapter.json``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import AdapterError
from ..core.layer import AdapterLayer, layers_holding
from ..lora.experts import LoraGroupedExperts
from ..lora.experts_layout import EXPERT_PROJS, check_zero, per_proj

log = logging.getLogger(__name__)

__all__ = [
    "check_vllm_export",
    "FUSED_SERVING",
    "SERVING_EXPERTS",
    "SERVING_TASK_TYPE",
    "ExpertPart",
    "expert_targets",
    "is_per_expert_part",
    "load_part",
    "native_keys",
    "pattern_names",
    "per_expert_part",
    "zero_pairs",
]

# family -> (the MoE block's attribute in a decoder layer, our projection -> the checkpoint's name), from
# vLLM's model files. vLLM's LoRA manager names modules by ``named_modules()``, i.e. attribute paths
# (``self.block_sparse_moe = MiniMaxM2MoE(..., prefix=f"{prefix}.mlp")`` is ``block_sparse_moe``: the
# ``prefix`` string only names weights for loading); the names are the FusedMoE ``ckpt_names``.
# Any other family: ("mlp", same names).
_W123 = ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})
SERVING_EXPERTS: dict[str, tuple[str, dict[str, str]]] = {"mixtral": _W123, "minimax_m2": _W123}
# Families whose vLLM model reads routed-expert LoRA in PEFT's fused 3D layout (``is_3d_moe_weight``
# on the model class) and no per-expert keys: for them the per-expert layout serves nobody.
FUSED_SERVING = frozenset({"gpt_oss"})
_NATIVE = ("mlp", {p: p for p in EXPERT_PROJS})
# PEFT validates task_type against its TaskType enum; vLLM and SGLang never read it.
SERVING_TASK_TYPE = "PER_EXPERT_SERVING_LAYOUT__FOR_VLLM_SGLANG__PEFT_CANNOT_LOAD__EXPORT_LAYOUT_PEFT_FOR_PEFT"
PARAM_OF = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_PER_EXPERT_KEY = re.compile(r"^(\d+)\.(\w+)\.lora_[AB]\.weight$")
_NATIVE_BLOCK = re.compile(r"\.mlp\.experts$")


def serving_names(family: str | None) -> tuple[str, dict[str, str]]:
    return SERVING_EXPERTS.get(family or "", _NATIVE)


@dataclass
class ExpertPart:
    """One routed-experts layer in this layout: its experts' module path in the file, tensors by key suffix,
    the projections the adapter targets and each one's (rank, alpha)."""

    path: str
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, tuple[int, float]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # proj -> (in, out), all three
    num_experts: int = 0
    names: dict[str, str] = field(default_factory=dict)  # our projection -> the file's name

    def pattern_key(self, proj: str) -> str:
        """The rank/alpha pattern key of ``proj`` on every expert of this layer."""
        return rf"{re.escape(self.path)}\.\d+\.{self.names[proj]}"


def per_expert_part(layer: AdapterLayer, path: str, name: str, *, family: str | None) -> ExpertPart:
    """A routed-experts layer's tensors in this layout, named for ``family``'s serving checkpoints."""
    if not isinstance(layer, LoraGroupedExperts):
        raise AdapterError(f"{path}: {type(layer).__name__} cannot write the per_expert layout")
    if family in FUSED_SERVING:
        raise AdapterError(
            f"{path}: {family} experts are served from PEFT's fused layout (vLLM reads no per-expert keys "
            f"for {family}); save with layout='peft'"
        )
    block, names = serving_names(family)
    part = ExpertPart(_NATIVE_BLOCK.sub(f".{block}.experts", path), {}, names=names)
    adapter = layer.adapters[name]
    for proj, (a, b) in per_proj(layer, name).items():
        part.ranks[proj] = adapter.file_rank_alpha(PARAM_OF[proj], a.shape[-2])
        for e in range(layer.num_experts):  # own storage: gate and up share A
            part.tensors[f"{e}.{names[proj]}.lora_A.weight"] = a[e].clone()
            part.tensors[f"{e}.{names[proj]}.lora_B.weight"] = b[e].clone()
    part.shapes = {p: layer.dims(p.removesuffix("_proj")) for p in EXPERT_PROJS}
    part.num_experts = layer.num_experts
    return part


def zero_pairs(part: ExpertPart, rank: int) -> None:
    """Add A = 0, B = 0 pairs of ``rank`` for the projections the adapter does not target."""
    for proj in EXPERT_PROJS:
        if proj in part.ranks:
            continue
        d_in, d_out = part.shapes[proj]
        for e in range(part.num_experts):
            part.tensors[f"{e}.{part.names[proj]}.lora_A.weight"] = torch.zeros(rank, d_in)
            part.tensors[f"{e}.{part.names[proj]}.lora_B.weight"] = torch.zeros(d_out, rank)


def native_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File tensors with every family's serving expert names taken back to ours
    (``block_sparse_moe.experts.{e}.w1`` -> ``mlp.experts.{e}.gate_proj``)."""
    out = {}
    for key, t in tensors.items():
        for block, names in SERVING_EXPERTS.values():
            for ours, theirs in names.items():
                key = re.sub(rf"(^|\.){block}\.experts\.(\d+)\.{theirs}\.", rf"\1mlp.experts.\2.{ours}.", key)
        out[key] = t
    return out


def pattern_names(path: str) -> list[str]:
    """The names a rank/alpha pattern of expert parameter ``path`` (``<experts>.gate_up_proj``) may
    be keyed by in a per-expert file: expert 0's projections under every family's serving names."""
    head, _, param = path.rpartition(".")
    if param not in ("gate_up_proj", "down_proj") or not head.endswith(".experts"):
        return []
    projs = [p for p in EXPERT_PROJS if PARAM_OF[p] == param]
    out = []
    for block, names in (_NATIVE, *SERVING_EXPERTS.values()):
        base = _NATIVE_BLOCK.sub(f".{block}.experts", head)
        out += [f"{base}.0.{names[p]}" for p in projs]
    return out


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.\d+\.(gate_proj|up_proj|down_proj)\.lora_[AB]\.weight$")


def expert_targets(keys: list[str], listed: list[str]) -> list[str] | None:
    """Target entries of a per-expert file read without moetune's metadata: every linear with
    tensors (its full path) and ``<experts path>.<proj>`` for each expert projection listed in
    ``target_modules`` (zero pairs of the others are not targets). None when ``keys`` (module path
    + suffix, our names) hold no per-expert tensors."""
    listed_names = {t.rsplit(".", 1)[-1] for t in listed}
    listed_names |= {ours for _, names in SERVING_EXPERTS.values() for ours, th in names.items() if th in listed_names}
    experts, linears = [], []
    for key in keys:
        if m := _EXPERT_KEY.match(key):
            if m.group(2) in listed_names:
                experts.append(f"{m.group(1)}.{m.group(2)}")
        elif ".lora_" in key:
            linears.append(key.split(".lora_")[0])
    if not experts and not any(_EXPERT_KEY.match(k) for k in keys):
        return None
    return list(dict.fromkeys(linears + experts))


def check_vllm_export(model: nn.Module, name: str, *, fused: bool) -> None:
    """What vLLM cannot serve exactly: with ``fused`` (its model reads PEFT's fused layout), an experts
    layer with only one of gate_up_proj / down_proj adapted is refused (``_stack_moe_lora_weights``
    asserts both and takes a lone pair for down_proj); a LoRA on ``kv_b_proj`` gets a warning (MLA
    decodes with the base ``kv_b_proj``, absorbed into W_UK/W_UV when the model loads)."""
    layers = layers_holding(model, name)
    for path, layer in layers:
        pairs = set(layer.pairs(name)) if isinstance(layer, LoraGroupedExperts) else {"gate_up", "down"}
        if fused and (not pairs & {"gate_up", "gate", "up"} or "down" not in pairs):
            raise AdapterError(
                f"{path} adapts only {sorted(pairs)}; vLLM's fused expert LoRA needs both gate_up_proj and "
                "down_proj adapted (it asserts otherwise): train with target 'experts', or merge the adapter"
            )
    if any(p.endswith(".kv_b_proj") for p, _ in layers):
        log.warning(
            "the adapter changes kv_b_proj: vLLM's multi-head latent attention decodes with the base kv_b_proj "
            "(absorbed into W_UK/W_UV when the model loads), so in vLLM it changes prefill but not decode; "
            "merge the adapter (moetune merge) to serve it exactly"
        )


def is_per_expert_part(layer: AdapterLayer, part: dict[str, torch.Tensor]) -> bool:
    """Whether one layer's file tensors are in this layout (a routed-experts layer, per-expert keys)."""
    return isinstance(layer, LoraGroupedExperts) and all(_PER_EXPERT_KEY.match(k) for k in part)


def load_part(layer: AdapterLayer, name: str, part: dict[str, torch.Tensor], *, where: str) -> None:
    """Fill adapter ``name`` of ``layer`` from its tensors, in this layout or PEFT's."""
    if not is_per_expert_part(layer, part):
        layer.load_peft_tensors(name, part, where=where)
        return
    held = set(per_proj(layer, name))
    for key in [k for k in part if _PER_EXPERT_KEY.match(k).group(2) not in held]:
        if key.endswith("lora_B.weight"):  # an untargeted projection's pair must add nothing
            check_zero(part[key], where=where, what=f"'{key}' (a projection this adapter does not target)")
        del part[key]
    layer.load_per_expert_tensors(name, part, where=where)
