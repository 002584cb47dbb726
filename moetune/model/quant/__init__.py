"""Stored formats of frozen bases: hold the weights compact, dequantize them for each matmul.

- :mod:`.stored` — :class:`StoredWeight`, the holder protocol every format implements;
- :mod:`.nf4` / :mod:`.nf4_weight` — NF4 (QLoRA), quantized from a full-precision folder
  (:mod:`.rounding`: nearest level by table, as ``bucketize`` rounds; on CPU by
  :mod:`.cpu_workers`, one per core, with :mod:`.scratch` buffers);
- :mod:`.fp8` — block-scaled FP8 as released (DeepSeek-V3, Qwen3 ``-FP8`` ...), read as stored;
- :mod:`.int4` — compressed-tensors pack-quantized INT4 (Kimi releases), read as stored;
- :mod:`.mxfp4` — MXFP4 experts (gpt-oss), read as stored;
- :mod:`.formats` — which of those a checkpoint's ``quantization_config`` declares;
- :mod:`.modules` — :class:`QuantLinear` and :class:`QuantGroupedExperts` (any format), the
  NF4 swap :func:`quantize_model` and its inverse :func:`dequantize_model`.
"""

from .fp8 import FP8Weight
from .int4 import Int4Weight
from .modules import (
    KEEP_FULL_PRECISION,
    QuantGroupedExperts,
    QuantLinear,
    dequantize_model,
    expert_shape,
    quantize_model,
    quantized_bytes,
    quantized_weights,
    stored_experts,
)
from .mxfp4 import MXFP4Weight
from .nf4_weight import NF4Weight
from .stored import StoredWeight

__all__ = [
    "FP8Weight",
    "Int4Weight",
    "KEEP_FULL_PRECISION",
    "MXFP4Weight",
    "NF4Weight",
    "QuantGroupedExperts",
    "QuantLinear",
    "StoredWeight",
    "dequantize_model",
    "expert_shape",
    "quantize_model",
    "quantized_bytes",
    "quantized_weights",
    "stored_experts",
]
