"""Which stored format a checkpoint's ``quantization_config`` declares, and its parameters.

:func:`stored_format` reads the config; every option moetune does not read (GPTQ, AWQ,
bitsandbytes-serialized, an unknown method, static activation scales, asymmetric or non-4-bit
integer weights ...) is refused with one line that names the key, the value and what is read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...errors import CheckpointError
from . import fp8, int4, mxfp4
from .stored import StoredWeight

SUPPORTED = (
    "fp8 (block-scaled e4m3: DeepSeek-V3, Qwen3 -FP8), "
    "compressed-tensors (pack-quantized symmetric int4 groups: Kimi-K2-Thinking), mxfp4 (gpt-oss experts)"
)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class StoredFormat:
    """A checkpoint's stored format.

    Attributes:
        method: ``quant_method``, "fp8", "compressed-tensors" or "mxfp4".
        marker: checkpoint-key suffix that marks a weight stored this way (after the weight's key).
        needs: suffixes every such weight must have ("" is the weight's own key).
        block: FP8 block (out, in).
        group: INT4 group size.
        scale_dtype: INT4 scale dtype, read from the checkpoint's header.
        values_per_element: weight values in each element of the first ``needs`` tensor (8 per int32
            word of packed INT4, 2 per MXFP4 byte).
    """

    method: str
    marker: str
    needs: tuple[str, ...]
    block: tuple[int, int] = (0, 0)
    group: int = 0
    scale_dtype: torch.dtype = torch.bfloat16
    values_per_element: int = 1  # weight values per element of the first ``needs`` tensor

    def holder(self, shape: tuple[int, ...], dtype: torch.dtype) -> StoredWeight:
        """An empty holder of this format for a weight of ``shape`` (on the current device)."""
        if self.method == "fp8":
            return fp8.FP8Weight(shape, block=self.block, dtype=dtype)
        if self.method == "mxfp4":
            return mxfp4.MXFP4Weight(shape, dtype=dtype)
        return int4.Int4Weight(shape, group=self.group, scale_dtype=self.scale_dtype, dtype=dtype)

    def experts_problem(self, hidden: int) -> str | None:
        """Why experts of this hidden size cannot be held fused, or None."""
        if self.method == "fp8" and hidden % self.block[0]:
            return f"expert hidden size {hidden} is not a multiple of the fp8 block {self.block[0]}"
        return None

    def with_header(self, dtypes: dict[str, str]) -> StoredFormat:
        """The format with what only the tensors say (INT4: the scales' dtype)."""
        if self.method != "compressed-tensors":
            return self
        found = {d for k, d in dtypes.items() if k.endswith(".weight_scale")}
        if len(found) > 1 or not found <= _DTYPES.keys():
            raise CheckpointError(f"int4 weight scales are {sorted(found)}; moetune reads one of {sorted(_DTYPES)}")
        return replace(self, scale_dtype=_DTYPES[found.pop()]) if found else self


def stored_format(cfg: dict, where: Path) -> StoredFormat | None:
    """The stored format ``config.json`` declares, None for a full-precision checkpoint.

    Raises:
        CheckpointError: a quantization method or option moetune does not read, named in one line.
    """
    quant = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not quant:  # (a multimodal wrapper may declare it on its text model)
        return None
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    if method == "fp8":
        return _fp8_format(quant, where)
    if method == "compressed-tensors":
        return _int4_format(quant, where)
    if method == "mxfp4":  # no options: blocks of 32 with e8m0 scales is the whole format
        return StoredFormat("mxfp4", mxfp4.MARKER, (mxfp4.MARKER, "_scales"), values_per_element=2)
    raise CheckpointError(
        f"{where}: quantization_config.quant_method '{method}' is not a format moetune reads "
        f"(supported: {SUPPORTED}); use the unquantized (bf16/fp16/fp32) checkpoint, or load a bf16 "
        "checkpoint with quantize='nf4' for 4-bit training"
    )


def _refusal(where: Path, key: str, value, method: str, allowed: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: quantization_config.{key} is {value!r}; moetune reads {method} checkpoints with {allowed}"
    )


def _fp8_format(quant: dict, where: Path) -> StoredFormat:
    def check(key: str, default, allowed: tuple, text: str) -> None:
        if quant.get(key, default) not in allowed:
            raise _refusal(where, key, quant.get(key), "fp8", text)

    check("fmt", "e4m3", ("e4m3",), "'e4m3'")
    check("activation_scheme", "dynamic", ("dynamic",), "'dynamic' (weights-only scales)")
    check("scale_fmt", "float", ("float", "ue8m0"), "'float' or 'ue8m0'")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _refusal(where, "weight_block_size", block, "fp8", "a block of two positive integers, e.g. [128, 128]")
    return StoredFormat("fp8", fp8.SCALE_SUFFIX, ("", fp8.SCALE_SUFFIX), block=(block[0], block[1]))


# The weights options of every config group, as the INT4 releases have them.
_INT4_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}


def _int4_format(quant: dict, where: Path) -> StoredFormat:
    method = "compressed-tensors"
    if quant.get("format") != "pack-quantized":
        raise _refusal(where, "format", quant.get("format"), method, "'pack-quantized'")
    if quant.get("quantization_status", "compressed") != "compressed":
        raise _refusal(where, "quantization_status", quant.get("quantization_status"), method, "'compressed'")
    if quant.get("kv_cache_scheme") is not None:
        raise _refusal(where, "kv_cache_scheme", quant.get("kv_cache_scheme"), method, "none")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refusal(where, "config_groups", groups, method, "at least one group")
    sizes = set()
    for name, group in groups.items():
        key = f"config_groups.{name}"
        for part in ("input_activations", "output_activations"):
            if group.get(part) is not None:
                raise _refusal(where, f"{key}.{part}", group.get(part), method, "none (weights-only int4)")
        if group.get("format", "pack-quantized") != "pack-quantized":
            raise _refusal(where, f"{key}.format", group.get("format"), method, "'pack-quantized'")
        weights = group.get("weights") or {}
        for option, value in _INT4_WEIGHTS.items():
            if weights.get(option, value if option == "dynamic" else None) != value:
                raise _refusal(where, f"{key}.weights.{option}", weights.get(option), method, repr(value))
        if weights.get("actorder") is not None:  # a stored activation order would need g_idx
            raise _refusal(where, f"{key}.weights.actorder", weights.get("actorder"), method, "none")
        sizes.add(weights.get("group_size"))
    size = sizes.pop()
    if sizes or not isinstance(size, int) or size <= 0 or size % int4.PER_WORD:
        raise _refusal(where, "config_groups.*.weights.group_size", size, method, "one size, a multiple of 8")
    return StoredFormat(method, int4.MARKER, (int4.MARKER, "_scale"), group=size, values_per_element=int4.PER_WORD)
