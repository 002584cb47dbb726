"""Checkpoints released quantized: which format, and which native weights it keeps compact.

``config.json``'s ``quantization_config`` names the format (:func:`stored_format`); anything
moetune does not read (GPTQ, AWQ, bitsandbytes-serialized, an unknown method) is refused with one
line. Which weights are stored that way is read off the checkpoint itself, not guessed from module
names: a weight is FP8 exactly when the folder has its ``..._scale_inv`` (releases leave routers,
norms, embeddings, the LM head and their ``modules_to_not_convert`` without one). Before any
tensor is read, :func:`swap_stored_modules` replaces those linears and expert groups of the model
(still on the meta device) with :class:`~.quant.QuantLinear` / :class:`~.quant.QuantGroupedExperts`
holding empty holders of the format, which the loader then fills byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError
from .hf import KeyMap
from .moe import GroupedExperts
from .quant import FP8Weight, QuantGroupedExperts, QuantLinear, StoredWeight, expert_shape
from .quant.fp8 import SCALE_SUFFIX

SUPPORTED = "fp8 (block-scaled e4m3, as DeepSeek-V3 and the Qwen3 -FP8 releases store it)"


@dataclass(frozen=True)
class StoredFormat:
    """A checkpoint's stored format: ``method`` (``quant_method``) and its parameters."""

    method: str
    block: tuple[int, int]
    scale_suffix: str = SCALE_SUFFIX

    def holder(self, shape: tuple[int, ...], dtype: torch.dtype) -> StoredWeight:
        """An empty holder of this format for a weight of ``shape`` (on the current device)."""
        return FP8Weight(shape, block=self.block, dtype=dtype)


def stored_format(cfg: dict, where: Path) -> StoredFormat | None:
    """The stored format ``config.json`` declares, None for a full-precision checkpoint.

    Raises:
        CheckpointError: a quantization method or option moetune does not read, named in one line.
    """
    quant = cfg.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    if method != "fp8":
        raise CheckpointError(
            f"{where}: quantization_config.quant_method '{method}' is not a format moetune reads "
            f"(supported: {SUPPORTED}); use the unquantized (bf16/fp16/fp32) checkpoint, or load a bf16 "
            "checkpoint with quantize='nf4' for 4-bit training"
        )
    return _fp8_format(quant, where)


def _fp8_format(quant: dict, where: Path) -> StoredFormat:
    def refuse(key: str, allowed: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: quantization_config.{key} is {quant.get(key)!r}; moetune reads fp8 checkpoints with {allowed}"
        )

    if quant.get("fmt", "e4m3") != "e4m3":
        raise refuse("fmt", "'e4m3'")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise refuse("activation_scheme", "'dynamic' (weights-only scales)")
    if quant.get("scale_fmt", "float") not in ("float", "ue8m0"):
        raise refuse("scale_fmt", "'float' or 'ue8m0'")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise refuse("weight_block_size", "a block of two positive integers, e.g. [128, 128]")
    return StoredFormat("fp8", (block[0], block[1]))


def checkpoint_dtypes(files: list[Path]) -> dict[str, str]:
    """Every checkpoint key -> its safetensors dtype name ("F8_E4M3", "F32" ...), headers only."""
    out: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                out.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
    return out


def stored_names(fmt: StoredFormat, dtypes: dict[str, str], keymap: KeyMap) -> set[str]:
    """Native weight names the checkpoint stores in ``fmt``: those with a scale tensor.

    Raises:
        CheckpointError: a float8 weight without scales (its values would be read as if unscaled), or
            no scales at all.
    """
    names = set()
    dtypes = {key: dtype for key, dtype in dtypes.items() if not keymap.skipped(key)}  # MTP layers are not built
    for key in dtypes:
        if key.endswith(fmt.scale_suffix):
            weight = key[: -len(fmt.scale_suffix)]
            if weight not in dtypes:
                raise CheckpointError(f"checkpoint has '{key}' but no tensor '{weight}' for it to scale")
            names.add(keymap.target(weight).name)
    for key, dtype in dtypes.items():
        if dtype.startswith("F8") and key + fmt.scale_suffix not in dtypes:
            raise CheckpointError(f"checkpoint tensor '{key}' is {dtype} but has no '{key}{fmt.scale_suffix}'")
    if not names:
        raise CheckpointError(
            f"config.json declares quant_method '{fmt.method}', but no checkpoint tensor has a '{fmt.scale_suffix}' "
            "(is the folder the quantized release?)"
        )
    return names


def swap_stored_modules(model: nn.Module, fmt: StoredFormat, names: set[str]) -> None:
    """Replace (on meta) the linears and expert groups whose weights are in ``names`` by holders of
    ``fmt``; every name must find its module.

    Raises:
        CheckpointError: a stored weight moetune cannot hold in that form (a router, one expert
            projection without the other, expert hidden size not a multiple of the block).
    """
    left = set(names)
    with torch.device("meta"):  # holders are allocated once, by the loader's to_empty
        _swap(model, fmt, left)
    if left:
        raise CheckpointError(
            f"checkpoint stores '{sorted(left)[0]}' in {fmt.method}, which moetune keeps in full precision "
            "(only linear layers and routed experts are read quantized)"
        )


def _swap(model: nn.Module, fmt: StoredFormat, left: set[str]) -> None:
    for path, module in list(model.named_modules())[1:]:
        dot = f"{path}."
        if type(module) is nn.Linear and dot + "weight" in left:
            left.discard(dot + "weight")
            dtype = module.weight.dtype
            stored = fmt.holder((module.out_features, module.in_features), dtype)
            new = QuantLinear(module.in_features, module.out_features, bias=module.bias is not None, stored=stored)
            if module.bias is not None:
                new.bias = module.bias
            model.set_submodule(path, new)
        elif type(module) is GroupedExperts and {dot + "gate_up_proj", dot + "down_proj"} & left:
            if not {dot + "gate_up_proj", dot + "down_proj"} <= left:
                raise CheckpointError(f"'{path}': the checkpoint stores some projections in {fmt.method}, not all")
            if module.hidden % fmt.block[0]:
                raise CheckpointError(
                    f"'{path}': expert hidden size {module.hidden} is not a multiple of the {fmt.method} block "
                    f"{fmt.block[0]}, so the fused gate/up scales cannot be stacked"
                )
            left.difference_update({dot + "gate_up_proj", dot + "down_proj"})
            dtype = module.gate_up_proj.dtype
            model.set_submodule(
                path, QuantGroupedExperts(**expert_shape(module), stored=lambda shape: fmt.holder(shape, dtype))
            )
