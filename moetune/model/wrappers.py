"""Text models inside multimodal wrappers: which config and which tensors are the text model.

Some releases wrap a plain decoder in a vision-language model (Kimi-K2.5/K2.6: a DeepSeek-V3 text
model beside a vision tower and a projector). moetune fine-tunes the text model: the wrapper's
``text_config`` becomes the model's config, checkpoint keys of the text model are renamed to the
plain causal-LM names, and the vision parts are skipped, with one log line saying so.

A wrapper is declared once in :data:`WRAPPERS` (a ``model_type``, how its text config's
``model_type`` maps to a supported family, which key prefixes are the text model and which are the
parts not built, and the wrapper's in-memory path of the text model for adapter files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError


@dataclass(frozen=True)
class Wrapper:
    """How one multimodal wrapper holds its text model.

    Attributes:
        model_type: the wrapper's ``model_type``.
        text_types: ``text_config.model_type`` -> the family that builds it (aliases included).
        default_text_type: the family when ``text_config`` names none.
        renames: (regex on a checkpoint key, replacement) giving the plain causal-LM key; the first
            that matches wins.
        skipped: key prefixes of the parts moetune does not build (vision tower, projector).
        tie_default: the wrapper's ``tie_word_embeddings`` when its config leaves it out.
        adapter_prefix: (native module-path prefix, the wrapper's in-memory prefix), so adapter files
            carry the module paths PEFT sees on the wrapper.
    """

    model_type: str
    text_types: dict[str, str]
    default_text_type: str
    renames: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...]
    tie_default: bool
    adapter_prefix: tuple[str, str]

    def text_key(self, key: str) -> str | None:
        """The plain causal-LM key of a checkpoint key, or None for a skipped (vision) part."""
        if key.startswith(self.skipped):
            return None
        for pattern, replacement in self.renames:
            new, n = re.subn(pattern, replacement, key, count=1)
            if n:
                return new
        return key


WRAPPERS: dict[str, Wrapper] = {
    # Kimi-K2.5 / K2.6 (transformers 5.17 models/kimi_k25). Released checkpoints hold
    # language_model.model.layers.*; transformers 5.17 writes language_model.model.blocks.* (its
    # vision rename 'blocks' <-> 'layers' reaches the text model when saving) and reads both.
    "kimi_k25": Wrapper(
        model_type="kimi_k25",
        text_types={"deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3"},
        default_text_type="deepseek_v3",
        renames=(
            (r"^language_model\.model\.blocks\.", "model.layers."),
            (r"^language_model\.model\.", "model."),
            (r"^language_model\.lm_head\.", "lm_head."),
            (r"^model\.language_model\.", "model."),
        ),
        skipped=("vision_tower.", "mm_projector.", "model.vision_tower.", "model.mm_projector."),
        tie_default=True,
        adapter_prefix=("model.", "model.language_model."),
    ),
    # Qwen3.5 / Qwen3.6-MoE (transformers 5.17 models/qwen3_5_moe): the hybrid text model under
    # model.language_model.*, the vision tower under model.visual.*, the multi-token-prediction module
    # under mtp.* (not built, as transformers skips it too).
    "qwen3_5_moe": Wrapper(
        model_type="qwen3_5_moe",
        text_types={"qwen3_5_moe_text": "qwen3_5_moe_text"},
        default_text_type="qwen3_5_moe_text",
        renames=((r"^model\.language_model\.", "model."),),
        skipped=("model.visual.", "mtp."),
        tie_default=False,
        adapter_prefix=("model.", "model.language_model."),
    ),
}


def unwrap_config(cfg: dict[str, Any], *, where: str = "config.json") -> tuple[dict[str, Any], Wrapper | None]:
    """The text model's config of a wrapper's config (and the wrapper), or ``cfg`` itself (and None).

    The text config takes the wrapper's ``tie_word_embeddings`` (transformers ties the wrapper's
    LM head by the wrapper's setting), its ``quantization_config`` (a quantized release declares its
    format there) and the family that builds it as ``model_type``.
    """
    wrapper = WRAPPERS.get(cfg.get("model_type"))
    if wrapper is None:
        return cfg, None
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: a '{wrapper.model_type}' config needs a 'text_config' object (the text model)")
    kind = text.get("model_type") or wrapper.default_text_type
    if kind not in wrapper.text_types:
        raise CheckpointError(
            f"{where}: text_config.model_type '{kind}' of a '{wrapper.model_type}' model is not supported "
            f"(supported: {', '.join(sorted(wrapper.text_types))})"
        )
    tie = cfg.get("tie_word_embeddings", wrapper.tie_default)
    out = {**text, "model_type": wrapper.text_types[kind], "tie_word_embeddings": tie}
    if "quantization_config" in cfg and "quantization_config" not in text:  # a quantized release's format
        out["quantization_config"] = cfg["quantization_config"]
    return out, wrapper


def _prefixes(wrapper: str | None) -> tuple[str, str]:
    """(native, in-memory) module-path prefix of a wrapper's text model; ("", "") for a plain model."""
    spec = WRAPPERS.get(wrapper) if wrapper else None
    return spec.adapter_prefix if spec is not None else ("", "")


def _swap_prefix(path: str, old: str, new: str) -> str:
    return new + path[len(old) :] if path.startswith(old) else path


def wrapped_path(wrapper: str | None, path: str) -> str:
    """A native module path as the wrapper holds it in memory (adapter files name those paths)."""
    native, wrapped = _prefixes(wrapper)
    return _swap_prefix(path, native, wrapped)


def native_path(wrapper: str | None, path: str) -> str:
    """Inverse of :func:`wrapped_path`: a wrapper's module path as the native model names it."""
    native, wrapped = _prefixes(wrapper)
    return _swap_prefix(path, wrapped, native)
