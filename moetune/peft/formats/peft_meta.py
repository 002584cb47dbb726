"""moetune's own metadata about a PEFT ``adapter_config.json``: what it holds, how it is tied to
the config, and where earlier versions kept it.

:func:`moetune_meta` is what PEFT's config cannot say (adapter name, layout, the original
:class:`LoraConfig`); the caller writes it to a sidecar file beside the config, because PEFT warns
about any key its config class does not know. :func:`config_fingerprint` hashes the config fields
the metadata stands in for, so a reader can tell whether ``adapter_config.json`` was rewritten after
the metadata was written. Earlier moetune versions embedded the metadata in the config under
``moetune`` (:data:`LEGACY_META_KEY`); :func:`split_meta` still takes it from there.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ...config import LoraConfig

LEGACY_META_KEY = "moetune"  # where moetune's metadata sat inside adapter_config.json before the sidecar
# The config fields moetune's metadata overrides or must agree with (targets, ranks, dropout); its
# fingerprint of them tells whether adapter_config.json was rewritten after the metadata was written.
FINGERPRINT_FIELDS = (
    "peft_type",
    "r",
    "init_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "target_parameters",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
)
FINGERPRINT_KEY = "adapter_config_sha256"
_SET_FIELDS = ("target_modules", "target_parameters", "layers_to_transform")


def moetune_meta(config: LoraConfig, *, name: str, layout: str) -> dict[str, Any]:
    """moetune's metadata for adapter ``name``: what PEFT's config cannot say (the exact targets,
    expert rank, trained dropout, that PiSSA was converted)."""
    return {
        "adapter_name": name,
        "layout": layout,
        "pissa_converted": config.init == "pissa",
        "lora_config": config.to_dict(),
    }


def config_fingerprint(raw: dict[str, Any]) -> str:
    """sha256 of the PEFT config fields moetune's metadata can stand in for (:data:`FINGERPRINT_FIELDS`),
    in canonical JSON: absent, null and empty are alike, integral floats are ints, and the target
    lists are sorted (PEFT keeps them as sets), so PEFT re-saving the same adapter keeps it."""
    canonical = {}
    for key in FINGERPRINT_FIELDS:
        value = raw.get(key)
        if isinstance(value, (list, tuple, set)) and key in _SET_FIELDS:
            value = sorted(value, key=json.dumps)
        canonical[key] = _canonical(value) if value not in (None, [], {}, "") else None
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def split_meta(raw: Any) -> tuple[Any, dict[str, Any] | None]:
    """``raw`` without the metadata earlier moetune versions embedded under ``moetune``, and that
    metadata (None when absent or not an object, as those versions ignored it then)."""
    if not isinstance(raw, dict) or LEGACY_META_KEY not in raw:
        return raw, None
    rest = {k: v for k, v in raw.items() if k != LEGACY_META_KEY}
    meta = raw[LEGACY_META_KEY]
    return rest, meta if isinstance(meta, dict) else None
