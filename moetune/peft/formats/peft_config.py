"""PEFT's ``adapter_config.json`` <-> :class:`LoraConfig`, and PEFT tensor-key normalisation.

What we write is exactly a PEFT 0.21 ``LoraConfig``: ``target_modules`` as the shortest
module-name suffixes that select exactly the adapted linears (``q_proj`` when every layer's is
adapted, ``layers.0.self_attn.q_proj`` when not), ``target_parameters`` as the expert wrapper gives
them, and ``rank_pattern`` / ``alpha_pattern`` only for modules whose rank or alpha differ from the
adapter-wide values. moetune's own metadata (adapter name, layout, the original
:class:`LoraConfig`) goes to a sidecar file beside it: :mod:`.peft_meta`.

What we read: PEFT LoRA configs whose options we implement exactly. Options that would change the
model in ways we do not reproduce (LoRA bias, modules_to_save, fan_in_fan_out, other variants,
inits that rewrite the base weights other than PiSSA) are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Callable

from ...config import LoraConfig
from ...errors import AdapterError, ConfigError
from .peft_meta import split_meta
from .per_expert import pattern_names

PREFIX = "base_model.model."
_LORA_TOKENS = ("lora_A", "lora_B", "lora_magnitude_vector")
# PEFT options that must be off (falsy) for us to reproduce the adapter exactly.
_MUST_BE_OFF = (
    "fan_in_fan_out",
    "lora_bias",
    "modules_to_save",
    "layer_replication",
    "use_qalora",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_bdlora",
    "exclude_modules",
    "megatron_config",
)
_EXPERT_PARAMS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
# Module names PEFT (0.21, with transformers >= 5) rewrites when it loads a config for these model
# types: a target_modules entry ending in one of them is taken for a transformers-v4 expert
# projection and retargeted to the fused 3D expert parameters (peft.utils.transformers_weight_conversion,
# per transformers' conversion pattern of the model type). A dense MLP's or shared expert's
# ``gate_proj`` would silently lose its adapter, so such linears are written as the equivalent
# ``target_parameters`` entry ``<name>.weight`` instead (PEFT wraps the 2D weight; same keys, same output).
PEFT_RETARGETED_NAMES: dict[str, frozenset[str]] = {
    **dict.fromkeys(
        ("qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "qwen3_next"),
        frozenset({"gate_proj", "up_proj", "down_proj", "gate"}),
    ),
    **dict.fromkeys(("mixtral", "minimax_m2"), frozenset({"w1", "w2", "w3", "gate"})),
}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def compact_targets(paths: list[str], all_paths: list[str]) -> list[str]:
    """Shortest dotted suffix of each path that matches (PEFT: equal or ``endswith('.'+s)``)
    only targeted modules among ``all_paths``; de-duplicated, in order."""
    targeted, chosen = set(paths), []
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(q in targeted for q in all_paths if q == suffix or q.endswith("." + suffix)):
                break
        if suffix not in chosen:
            chosen.append(suffix)
    return chosen


def rank_alpha(config: LoraConfig, layers: list[tuple[str, dict, dict]]) -> tuple[int, float, dict, dict]:
    """Adapter-wide r and alpha, and the patterns that differ from them.

    Args:
        layers: per adapted module, its path and the ``rank_pattern`` / ``alpha_pattern`` it
            reported (empty when it uses the config's r and alpha).

    Returns:
        The most common (r, alpha) over modules, then the rank and alpha patterns that differ.
    """
    full = [(ranks or {path: config.r}, alphas or {path: config.alpha}) for path, ranks, alphas in layers]
    counts = Counter((next(iter(ranks.values())), next(iter(alphas.values()))) for ranks, alphas in full)
    r, alpha = counts.most_common(1)[0][0] if counts else (config.r, config.alpha)
    rank_pattern = {k: v for ranks, _ in full for k, v in ranks.items() if v != r}
    alpha_pattern = {k: _number(v) for _, alphas in full for k, v in alphas.items() if v != alpha}
    return r, alpha, rank_pattern, alpha_pattern


def config_to_peft(
    config: LoraConfig,
    *,
    r: int,
    alpha: float,
    targets: dict[str, list],
    rank_pattern: dict,
    alpha_pattern: dict,
    base_model: str | None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` mapping of an adapter trained with ``config``."""
    init = {"kaiming": True, "gaussian": "gaussian", "pissa": True}[config.init]  # PiSSA is saved converted
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": _number(alpha),
        # PEFT's target_parameters wrapper refuses dropout; it changes nothing at inference, and
        # moetune's metadata (peft_meta.moetune_meta) keeps the trained value.
        "lora_dropout": 0.0 if targets.get("target_parameters") else config.dropout,
        "target_modules": targets.get("target_modules") or None,
        "target_parameters": targets.get("target_parameters") or None,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": init,
        "layers_to_transform": config.layers_to_transform,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _check_supported(raw: dict[str, Any], where: str) -> None:
    if raw.get("peft_type") != "LORA":
        raise AdapterError(
            f"{where}: peft_type {raw.get('peft_type')!r} is not supported (moetune reads LORA adapters)"
        )
    for key in _MUST_BE_OFF:
        if raw.get(key):
            raise AdapterError(f"{where}: '{key}': {raw[key]!r} is not supported by moetune (it must be off/null)")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias {raw['bias']!r} is not supported (only 'none')")
    pattern = raw.get("layers_pattern")
    if pattern not in (None, "", "layers", ["layers"]):
        raise AdapterError(f"{where}: layers_pattern {pattern!r} is not supported (decoder layers are 'layers')")


def _init(value: Any, where: str) -> str:
    if value is True or value is False or value == "eva":  # values are overwritten by the file
        return "kaiming"
    if value == "gaussian":
        return "gaussian"
    if isinstance(value, str) and value.startswith("pissa"):
        return "pissa"  # the file holds trained A/B on top of the PiSSA residual, as PEFT loads it
    raise AdapterError(
        f"{where}: init_lora_weights {value!r} rewrites the base weights in a way moetune does not "
        "reproduce; save the adapter with PEFT's path_initial_model_for_weight_conversion first"
    )


def _targets(raw: dict[str, Any], ours: dict[str, Any] | None, where: str) -> dict[str, Any]:
    if ours is not None:  # our metadata's LoraConfig: the exact original targets
        return {
            k: ours.get(k)
            for k in ("target_modules", "target_regex", "layers_to_transform", "expert_rank")
            if ours.get(k) is not None
        }
    modules, params = raw.get("target_modules"), raw.get("target_parameters") or []
    if isinstance(modules, str) and not params:
        return {"target_regex": modules, "layers_to_transform": raw.get("layers_to_transform")}
    if isinstance(modules, str):
        raise AdapterError(f"{where}: a regex target_modules together with target_parameters is not supported")
    names = list(modules or [])
    for entry in params:
        prefix, _, param = entry.rpartition(".")
        if param == "weight" and prefix:  # a linear's 2D weight, the same LoRA as targeting the module
            names.append(prefix)
            continue
        if param not in _EXPERT_PARAMS:
            raise AdapterError(
                f"{where}: target_parameters entry {entry!r} is not supported "
                f"(moetune adapts expert parameters {', '.join(_EXPERT_PARAMS)})"
            )
        names += [f"{prefix or 'experts'}.{proj}" for proj in _EXPERT_PARAMS[param]]
    if not names:
        raise AdapterError(f"{where}: neither target_modules nor target_parameters is set")
    return {"target_modules": list(dict.fromkeys(names)), "layers_to_transform": raw.get("layers_to_transform")}


def config_from_peft(
    raw: Any, where: str, meta: dict[str, Any] | None = None
) -> tuple[LoraConfig, Callable[[str, LoraConfig], LoraConfig] | None]:
    """A :class:`LoraConfig` for a PEFT (or moetune) ``adapter_config.json`` mapping, and a
    per-module override that applies its ``rank_pattern`` / ``alpha_pattern`` (None if empty).

    Args:
        meta: moetune's metadata for the folder (:func:`~.peft_meta.moetune_meta`); when None, the metadata
            an earlier moetune embedded in ``raw`` is used, if any.
    """
    raw, legacy = split_meta(raw)
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: expected a JSON object")
    _check_supported(raw, where)
    ours = (meta if meta is not None else legacy or {}).get("lora_config")
    ours = ours if isinstance(ours, dict) else None
    options = {k: v for k, v in _targets(raw, ours, where).items() if v is not None}
    dropout = (ours or {}).get("dropout", raw.get("lora_dropout", 0.0))  # ours: the trained value
    try:
        config = LoraConfig(
            r=raw.get("r", 8),
            alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(dropout),
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            init=_init(raw.get("init_lora_weights", True), where),
            **options,
        )
    except ConfigError as err:
        raise AdapterError(f"{where}: {err}") from None
    ranks, alphas = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    if not ranks and not alphas:
        return config, None

    def per_module(path: str, cfg: LoraConfig) -> LoraConfig:
        names = [path, *pattern_names(path)]  # a per-expert file keys expert parameters per expert
        r = next((v for k, v in ranks.items() if any(_pattern_match(k, n) for n in names)), cfg.r)
        alpha = next((v for k, v in alphas.items() if any(_pattern_match(k, n) for n in names)), cfg.alpha)
        return dataclasses.replace(cfg, r=int(r), alpha=float(alpha)) if (r, alpha) != (cfg.r, cfg.alpha) else cfg

    return config, per_module


def _pattern_match(key: str, name: str) -> bool:
    """PEFT's ``get_pattern_key`` rule: ``key`` matches the end of ``name`` at a dot boundary."""
    try:
        return re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error:
        return False


def normalise_key(key: str) -> str:
    """File key -> module path + suffix: drop ``base_model.model.`` and any adapter name PEFT put
    in the key (``.lora_A.default.weight`` -> ``.lora_A.weight``;
    ``.lora_magnitude_vector.default.weight`` -> ``.lora_magnitude_vector``)."""
    body = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    tokens = body.split(".")
    idx = max((i for i, t in enumerate(tokens) if t in _LORA_TOKENS), default=None)
    if idx is None:
        return body
    rest = tokens[idx + 1 :]
    if rest and rest[0] not in ("weight", "bias"):
        rest = rest[1:]
    if tokens[idx] == "lora_magnitude_vector" and rest == ["weight"]:
        rest = []
    return ".".join(tokens[: idx + 1] + rest)
