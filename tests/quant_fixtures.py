"""Tiny checkpoints in the formats models are released in, written with transformers' own code.

FP8 (block-scaled e4m3): transformers' ``Fp8Quantize`` turns each quantized weight into
``float8_e4m3fn`` + float32 ``weight_scale_inv``, the tensors and names of the DeepSeek-V3 and
Qwen3 ``-FP8`` releases. ``Fp8Quantize`` leaves a weight whose dims are not multiples of the block
unquantized, while DeepSeek's release quantizes it with a partial last block (``kv_a_proj_with_mqa``,
576 rows, has 5 row blocks); such a weight is quantized zero-padded to whole blocks and cropped,
which gives exactly those scales (a zero pad never raises a block's max |w|).
The dequantized reference folder uses transformers' ``Fp8Dequantize`` the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
from transformers.utils.quantization_config import FineGrainedFP8Config

# Never quantized in the releases: embeddings, norms, routers, the LM head.
FP8_SKIP = ("embed_tokens", "norm", "lm_head", "mlp.gate.weight")


def _padded(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = w.shape[-2:]
    pr, pc = math.ceil(rows / block[0]) * block[0] - rows, math.ceil(cols / block[1]) * block[1] - cols
    return F.pad(w, (0, pc, 0, pr))


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' block FP8 quantization of a (..., out, in) weight -> (float8 weight, fp32 scale_inv)."""
    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=list(block))))
    out = op.convert({"w.weight": _padded(w, block)})
    rows, cols = w.shape[-2:]
    return out["w.weight"][..., :rows, :cols].contiguous(), out["w.weight_scale_inv"]


def fp8_dequantize_reference(q: torch.Tensor, scale_inv: torch.Tensor, block, dtype) -> torch.Tensor:
    """transformers' ``Fp8Dequantize`` of a (possibly partial-block) FP8 weight."""
    padded = _padded(q.float(), block).to(q.dtype)
    rows, cols = q.shape[-2:]
    return Fp8Dequantize(None)._dequantize_one(padded, scale_inv, output_dtype=dtype)[..., :rows, :cols]


def write_fp8_folder(src: Path, dst: Path, block=(16, 16), not_converted: list[str] | None = None) -> None:
    """The FP8 release of the full-precision folder ``src`` (one safetensors file) in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, w in load_file(str(src / "model.safetensors")).items():
        if key.endswith(".weight") and w.ndim == 2 and not any(s in key for s in FP8_SKIP):
            tensors[key], tensors[key + "_scale_inv"] = fp8_quantize(w, block)
        else:
            tensors[key] = w
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
        **({"modules_to_not_convert": not_converted} if not_converted else {}),
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def write_dequantized_folder(src: Path, dst: Path, dtype=torch.float32) -> None:
    """The FP8 folder ``src`` dequantized by transformers' ``Fp8Dequantize``, as a plain folder."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"]
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for key, t in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        scale = tensors.get(key + "_scale_inv")
        out[key] = t if scale is None else fp8_dequantize_reference(t, scale, block, dtype).contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
