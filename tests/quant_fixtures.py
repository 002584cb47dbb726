"""Tiny checkpoints in the formats models are released in, written with transformers' own code.

FP8 (block-scaled e4m3): transformers' ``Fp8Quantize`` turns each quantized weight into
``float8_e4m3fn`` + float32 ``weight_scale_inv``, the tensors and names of the DeepSeek-V3 and
Qwen3 ``-FP8`` releases. ``Fp8Quantize`` leaves a weight whose dims are not multiples of the block
unquantized, while DeepSeek's release quantizes it with a partial last block (``kv_a_proj_with_mqa``,
576 rows, has 5 row blocks); such a weight is quantized zero-padded to whole blocks and cropped,
which gives exactly those scales (a zero pad never raises a block's max |w|).
The dequantized reference folder uses transformers' ``Fp8Dequantize`` the same way.

INT4 (compressed-tensors pack-quantized, symmetric groups): the ``compressed_tensors`` package's own
scale computation (``calculate_qparams``) and ``PackedQuantizationCompressor`` write
``weight_packed`` / ``weight_scale`` / ``weight_shape`` from bf16 weights, as the Kimi releases are;
its ``decompress`` gives the dequantized reference folder.

MXFP4 (gpt-oss experts): the experts' ``*_blocks`` (E, out, in/32, 16) uint8 and ``*_scales``
(E, out, in/32) uint8 hold random e2m1 codes and exponents (every byte pattern is a valid MXFP4
weight), with gate and up rows interleaved as gpt-oss stores them; transformers'
``convert_moe_packed_tensors`` gives the dequantized reference folder, in gpt-oss's full-precision
layout (E, in, out).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
from transformers.utils.quantization_config import FineGrainedFP8Config

# Never quantized in the releases: embeddings, norms, routers, the LM head.
FP8_SKIP = ("embed_tokens", "norm", "lm_head", "mlp.gate.weight")


def read_folder(src: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (one safetensors file) and config.json of a checkpoint folder."""
    return load_file(str(src / "model.safetensors")), json.loads((src / "config.json").read_text())


def write_folder(dst: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    """A checkpoint folder of ``tensors`` (one safetensors file) and ``cfg`` (config.json)."""
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


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
    full, cfg = read_folder(src)
    tensors = {}
    for key, w in full.items():
        if key.endswith(".weight") and w.ndim == 2 and not any(s in key for s in FP8_SKIP):
            tensors[key], tensors[key + "_scale_inv"] = fp8_quantize(w, block)
        else:
            tensors[key] = w
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
        **({"modules_to_not_convert": not_converted} if not_converted else {}),
    }
    write_folder(dst, tensors, cfg)


def write_dequantized_folder(src: Path, dst: Path, dtype=torch.float32) -> None:
    """The FP8 folder ``src`` dequantized by transformers' ``Fp8Dequantize``, as a plain folder."""
    tensors, cfg = read_folder(src)
    block = cfg.pop("quantization_config")["weight_block_size"]
    out = {}
    for key, t in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        scale = tensors.get(key + "_scale_inv")
        out[key] = t if scale is None else fp8_dequantize_reference(t, scale, block, dtype).contiguous()
    write_folder(dst, out, cfg)


INT4_GROUP = 32
# Kimi-K2-Thinking's ignore list: only the routed experts are int4.
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def int4_scheme(group: int = INT4_GROUP):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    return QuantizationScheme(targets=["Linear"], weights=args)


def int4_compress(w: torch.Tensor, group: int = INT4_GROUP) -> dict[str, torch.Tensor]:
    """compressed-tensors' pack-quantized INT4 of a bf16 (..., out, in) weight."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = int4_scheme(group)
    groups = w.unflatten(-1, (w.shape[-1] // group, group))
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
    return PackedQuantizationCompressor.compress(state, scheme)


def int4_decompress(packed: dict[str, torch.Tensor], group: int = INT4_GROUP) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    return PackedQuantizationCompressor.decompress(packed, int4_scheme(group))["weight"]


def _ignored(module: str, ignore: list[str]) -> bool:
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)


def write_int4_folder(src: Path, dst: Path, ignore: list[str], group: int = INT4_GROUP) -> None:
    """The pack-quantized INT4 release of ``src`` in ``dst`` (weights not ignored, bf16 scales)."""
    full, cfg = read_folder(src)
    tensors = {}
    for key, w in full.items():
        module = key.removesuffix(".weight")
        quantized = w.ndim == 2 and not any(s in key for s in FP8_SKIP) and not _ignored(module, ignore)
        if key.endswith(".weight") and quantized:
            for suffix, t in int4_compress(w.to(torch.bfloat16), group).items():
                tensors[module + "." + suffix] = t
        else:
            tensors[key] = w
    # The keys Kimi-K2-Thinking's config.json has (newer compressed-tensors leaves the None ones out).
    extra = {"actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    weights = {**extra, **int4_scheme(group).weights.model_dump(mode="json")}
    cfg["quantization_config"] = {
        "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                      "weights": weights}},
        "format": "pack-quantized",
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }
    write_folder(dst, tensors, cfg)


def write_int4_dequantized_folder(src: Path, dst: Path, group: int = INT4_GROUP) -> None:
    """The INT4 folder ``src`` decompressed by compressed-tensors, as a plain folder."""
    tensors, cfg = read_folder(src)
    cfg.pop("quantization_config")
    out = {}
    for key, t in tensors.items():
        if key.endswith("weight_packed"):
            module = key.removesuffix(".weight_packed")
            parts = {s: tensors[f"{module}.weight_{s}"] for s in ("packed", "scale", "shape")}
            out[module + ".weight"] = int4_decompress({f"weight_{s}": t for s, t in parts.items()}, group)
        elif not key.endswith(("weight_scale", "weight_shape")):
            out[key] = t
    write_folder(dst, out, cfg)


def write_mxfp4_folder(src: Path, dst: Path, exponents=(121, 125), seed: int = 0) -> None:
    """gpt-oss's MXFP4 release of the full-precision gpt-oss folder ``src``: routed experts as random
    MXFP4 codes with scales 2**(exponents - 127), the rest as it is."""
    full, cfg = read_folder(src)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, w in full.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = w.shape  # gpt-oss's full-precision layout is (E, in, out)
            grid = (experts, outputs, inputs // 32)
            tensors[key + "_blocks"] = torch.randint(0, 256, (*grid, 16), generator=gen, dtype=torch.uint8)
            tensors[key + "_scales"] = torch.randint(*exponents, grid, generator=gen, dtype=torch.uint8)
        else:
            tensors[key] = w
    cfg["quantization_config"] = {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    write_folder(dst, tensors, cfg)


def write_mxfp4_dequantized_folder(src: Path, dst: Path) -> None:
    """The MXFP4 folder ``src`` dequantized by transformers' ``convert_moe_packed_tensors`` (fp32)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors, cfg = read_folder(src)
    cfg.pop("quantization_config")
    out = {}
    for key, t in tensors.items():
        if key.endswith("_blocks"):
            base = key.removesuffix("_blocks")
            out[base] = convert_moe_packed_tensors(t, tensors[base + "_scales"], dtype=torch.float32)
        elif not key.endswith("_scales"):
            out[key] = t
    write_folder(dst, out, cfg)


def nonzero_lora_b(model, std: float = 0.05) -> None:
    """Every LoRA B drawn from N(0, std^2) (B starts at zero), so the adapters change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def lora_grad_gap(quant, ids: torch.Tensor) -> tuple[float, torch.nn.Module]:
    """Give the LoRA pairs on the quantized base ``quant`` non-zero B, then run one backward of the LM
    loss on ``ids`` through it and through a dequantized copy, dropout drawn alike: the largest
    gradient difference, and the copy. Both have gradients on the same tensors, experts' among them."""
    import copy

    from moetune.model.quant import dequantize_model

    nonzero_lora_b(quant)
    plain = dequantize_model(copy.deepcopy(quant))
    grads = []
    for model in (quant, plain):
        model.train()
        torch.manual_seed(7)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    return max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]), plain
