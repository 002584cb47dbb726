"""Target matching: which modules a :class:`~moetune.config.LoraConfig` adapts, and the module walk
and wrapper lookup it rests on.

Targets are Hugging Face module names matched as suffixes of the full module path
(``q_proj`` matches ``model.layers.0.self_attn.q_proj``; ``mlp.down_proj`` only the dense MLP's):

- a name that ends at a module with an adapter wrapper (``nn.Linear``, routed experts) adapts it;
- a name that ends at a container (``shared_expert``, ``shared_experts``, ``self_attn``) adapts
  every linear under it, routers excepted;
- ``experts.gate_proj`` / ``experts.up_proj`` / ``experts.down_proj`` adapt one projection of the
  routed experts (``experts`` adapts all three);
- ``all-linear`` (alone, or as an entry next to other names) adapts every linear except the LM
  head and the routers (``gate``, ``router``, ``shared_expert_gate``); name those to add them;
- ``target_regex`` instead matches full module paths with ``re.fullmatch``;
- a Megatron-style alias (``linear_proj``, ``linear_fc1``, ``linear_kv_up_proj`` ...) stands for
  the Hugging Face names of :data:`~moetune.peft.core.aliases.TARGET_ALIASES`, unless the model has a
  module of that name.

``layers_to_transform`` keeps decoder layers by index (``...layers.{i}...``); modules outside the
decoder layers (the LM head) are not affected by it. The wrapper class of a module is looked up in
:data:`~moetune.peft.core.registry.WRAPPERS`.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from ...config import LoraConfig
from ...errors import AdapterError, did_you_mean
from .aliases import TARGET_ALIASES, alias_targets
from .layer import AdapterLayer
from .registry import base_of, wrapper_for

EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
Parts = frozenset | None  # expert projections; None = the whole module


# --- module walking -------------------------------------------------------------------------
def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module; an adapter wrapper stands for its base and is not entered,
    unless it keeps its base's children under their own paths (``transparent``, a MixLoRA FFN)."""
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        yield path, module
        if not isinstance(module, AdapterLayer) or module.transparent:
            kids = [(f"{path}.{n}" if path else n, c) for n, c in module.named_children()]
            stack.extend(reversed(kids))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(base_of(module), nn.Linear)


def _is_router(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in ROUTER_NAMES


def _suffix_match(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def layer_index(path: str) -> int | None:
    m = _LAYER_INDEX.search(path)
    return int(m.group(1)) if m else None


# --- target resolution ----------------------------------------------------------------------
def _match_entry(entry: str, modules: dict[str, nn.Module]) -> tuple[list[tuple[str, Parts]], list[str]]:
    """Modules one target_modules entry selects, and the matched modules that cannot take a LoRA."""
    hits: list[tuple[str, Parts]] = []
    refused: list[str] = []

    def linears_under(prefix: str) -> list[tuple[str, Parts]]:
        return [
            (q, None) for q, n in modules.items() if q.startswith(prefix + ".") and _is_linear(n) and not _is_router(q)
        ]

    if entry == "all-linear":
        return [
            (p, None)
            for p, m in modules.items()
            if _is_linear(m) and not _is_router(p) and p.rsplit(".", 1)[-1] != "lm_head"
        ], refused
    for path, module in modules.items():
        if not _suffix_match(path, entry):
            continue
        inner = [(path, None)] if wrapper_for(module) is not None else linears_under(path)
        hits += inner
        if not inner:
            refused.append(f"{path} ({type(module).__name__})")
    prefix, _, part = entry.rpartition(".")
    if prefix and part in EXPERT_PARTS:
        for path, module in modules.items():
            if _suffix_match(path, prefix) and not _is_linear(module):
                if wrapper_for(module) is not None:
                    hits.append((path, frozenset({part})))
                else:
                    refused.append(f"{path} ({type(module).__name__})")
    return hits, refused


def _match_alias(entry: str, modules: dict[str, nn.Module]) -> tuple[list[tuple[str, Parts]], list[str]]:
    """What the Hugging Face names behind alias ``entry`` select together (absent names skipped)."""
    hits: list[tuple[str, Parts]] = []
    refused: list[str] = []
    for name in alias_targets(entry):
        more, no = _match_entry(name, modules)
        hits += more
        refused += no
    return hits, refused


def alias_map(model: nn.Module) -> dict[str, list[str]]:
    """Alias -> the Hugging Face target names it selects in ``model``, for the aliases that select
    something here (and are not the name of one of its own modules). Works on a meta-device model."""
    names = targetable_names(model)
    out = {}
    for alias, targets in TARGET_ALIASES.items():
        present = [t for t in targets if t in names]
        if present and alias not in names:
            out[alias] = present
    return out


def _merge_parts(old: Parts, new: Parts) -> Parts:
    return None if old is None or new is None else old | new


def plan_targets(model: nn.Module, config: LoraConfig) -> dict[str, Parts]:
    """Module path -> expert parts (None = whole module) that ``config`` adapts.

    Raises:
        AdapterError: for an entry (or the regex) that selects nothing adaptable, naming the
            targetable names of this model.
    """
    modules = dict(logical_modules(model))
    layers = config.layers_to_transform
    entries = (
        [config.target_regex]
        if config.target_regex
        else (["all-linear"] if isinstance(config.target_modules, str) else list(config.target_modules))
    )
    plan: dict[str, Parts] = {}
    for entry in entries:
        if config.target_regex:
            hits = [(p, None) for p, m in modules.items() if re.fullmatch(entry, p) and wrapper_for(m)]
            refused = [
                f"{p} ({type(m).__name__})" for p, m in modules.items() if re.fullmatch(entry, p) and not wrapper_for(m)
            ]
        else:
            hits, refused = _match_entry(entry, modules)
            if not hits and alias_targets(entry):
                hits, refused = _match_alias(entry, modules)
        kept = [(p, parts) for p, parts in hits if layers is None or layer_index(p) in (None, *layers)]
        if not kept:
            raise AdapterError(_no_match(model, entry, bool(config.target_regex), hits, refused, layers))
        for path, parts in kept:
            plan[path] = _merge_parts(plan[path], parts) if path in plan else parts
    return plan


def _no_match(model, entry, is_regex, hits, refused, layers) -> str:
    what = f"target_regex {entry!r}" if is_regex else f"target_modules entry '{entry}'"
    if not is_regex and alias_targets(entry):
        what += f" (alias of {', '.join(alias_targets(entry))})"
    if hits:
        reason = f" inside layers_to_transform {layers}"
    elif refused:
        reason = f": it matches {refused[0]}, which cannot take a LoRA"
    else:
        reason = ""
    names = targetable_names(model)
    hint = "" if is_regex else did_you_mean(entry.rsplit(".", 1)[-1], names)
    return f"{what} matches no adaptable module{reason}{hint}; targetable names in this model: {', '.join(names)}"


def targetable_names(model: nn.Module) -> list[str]:
    """Target names this model offers: linear names (``q_proj`` ... ``lm_head``), ``experts`` and
    ``experts.gate_proj``/``up_proj``/``down_proj`` (when routed-expert LoRA is available), and
    ``shared_expert``/``shared_experts`` containers. Works on a meta-device model."""
    names: list[str] = []
    for path, module in logical_modules(model):
        last = path.rsplit(".", 1)[-1]
        if _is_linear(module):
            new = [last]
        elif wrapper_for(module) is not None:
            new = [last, *(f"{last}.{p}" for p in EXPERT_PARTS)]
        elif last.startswith("shared_expert") and any(_is_linear(m) for m in module.modules()):
            new = [last]
        else:
            new = []
        names += [n for n in new if n not in names]
    return names
