"""Checkpoints released quantized: which format, and which native weights it keeps compact.

``config.json``'s ``quantization_config`` names the format (:func:`stored_format`); anything
moetune does not read (GPTQ, AWQ, bitsandbytes-serialized, an unknown method) is refused with one
line. Which weights are stored that way is read off the checkpoint itself, not guessed from module
names: a weight is FP8 exactly when the folder has its ``..._scale_inv``, INT4 when it has its
``..._packed``, MXFP4 when it has its ``..._blocks`` (releases leave routers, norms, embeddings, the LM head and their
``modules_to_not_convert`` / ``ignore`` lists in full precision). The formats and their config
parsing live in :mod:`.quant.formats`. Before any
tensor is read, :func:`swap_stored_modules` replaces those linears and expert groups of the model
(still on the meta device) with :class:`~.quant.QuantLinear` / :class:`~.quant.QuantGroupedExperts`
holding empty holders of the format, which the loader then fills byte for byte.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError
from ..safetensors_check import DTYPE_BYTES
from .hf import KeyMap
from .moe import GroupedExperts
from .quant import NF4Weight, QuantGroupedExperts, QuantLinear, quantize_model, stored_experts
from .quant.formats import StoredFormat, stored_format
from .wrappers import Wrapper

log = logging.getLogger(__name__)
__all__ = [
    "StoredFormat",
    "folder_format",
    "stored_format",
    "stored_layout",
    "stored_names",
    "stored_summary",
    "stored_to_nf4",
    "swap_stored_modules",
]


def folder_format(cfg: dict, folder: Path, quantize: str | None) -> StoredFormat | None:
    """The stored format of the model folder with ``config.json`` ``cfg``, loaded with ``quantize``."""
    fmt = stored_format(cfg, folder / "config.json")
    if fmt is not None and quantize is not None:
        log.warning(
            "quantize=%r on '%s', stored in %s: each weight is dequantized from %s and quantized again to %s "
            "(the second rounding adds to the first); load it without quantize to keep it as released",
            quantize, folder, fmt.method, fmt.method, quantize,
        )
    return fmt


def stored_to_nf4(model: nn.Module) -> nn.Module:
    """NF4 in place of every stored weight (dequantized in float32, one weight at a time), then NF4
    for the linears and experts the checkpoint kept in full precision (:func:`quantize_model`)."""
    for module in model.modules():
        names = ["stored"] if isinstance(module, QuantLinear) else []
        names += ["gate_up_proj", "down_proj"] if isinstance(module, QuantGroupedExperts) else []
        for name in names:
            held = getattr(module, name)
            if not isinstance(held, NF4Weight):
                nf4 = NF4Weight(tuple(held.shape), dtype=held.dtype, device=held.device)
                nf4.write(0, held.dequantize(torch.float32))
                setattr(module, name, nf4)
    return quantize_model(model)


def stored_summary(cfg: dict, folder: Path, files: list[Path], family: str, wrapper: Wrapper | None = None) -> str:
    """One line for ``moetune inspect``: the stored format and the bytes the base will hold.

    Read from the headers only: a stored weight is held as it is in the file, every other tensor in
    the checkpoint's dtype (loading with another ``dtype`` scales that part).
    """
    try:
        fmt = stored_format(cfg, folder / "config.json")
    except CheckpointError as exc:
        return f"not loadable: {exc}"
    if fmt is None:
        return "none (full precision)"
    keymap = KeyMap(family)
    headers = _text_keys(checkpoint_headers(files), wrapper)
    dtypes = {k: d for k, (d, _) in headers.items()}
    names = stored_names(fmt.with_header(dtypes), dtypes, keymap)
    nbytes = {k: math.prod(shape) * DTYPE_BYTES[d] for k, (d, shape) in headers.items() if not keymap.skipped(k)}
    stored = [k for k in nbytes if keymap.target(_weight_key(k, fmt)).name in names and not k.endswith("_shape")]
    values = [k for k in stored if k == _weight_key(k, fmt) + fmt.needs[0]]  # one tensor per weight
    params = sum(math.prod(headers[k][1]) * fmt.values_per_element for k in values)
    held = sum(nbytes[k] for k in stored)
    rest = sum(b for k, b in nbytes.items() if not k.endswith("_shape")) - held
    return (
        f"{fmt.method}, {params / 1e6:,.2f}M parameters stored at {held / max(params, 1):.3f} bytes each "
        f"(scales included); the base holds {(held + rest) / 2**20:,.1f} MiB, {rest / 2**20:,.1f} MiB of it "
        "full precision"
    )


def _text_keys(headers: dict, wrapper: Wrapper | None) -> dict:
    if wrapper is None:
        return headers
    return {text: v for key, v in headers.items() if (text := wrapper.text_key(key)) is not None}


def _weight_key(key: str, fmt: StoredFormat) -> str:
    """The weight's own key of a stored tensor's key (``...weight_scale_inv`` -> ``...weight``)."""
    suffix = next((s for s in fmt.needs if s and key.endswith(s)), "")
    return key[: len(key) - len(suffix)]


def checkpoint_headers(files: list[Path]) -> dict[str, tuple[str, list[int]]]:
    """Every checkpoint key -> (safetensors dtype name, shape), headers only."""
    out: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    out[key] = (piece.get_dtype(), piece.get_shape())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
    return out


def checkpoint_dtypes(files: list[Path]) -> dict[str, str]:
    """Every checkpoint key -> its safetensors dtype name ("F8_E4M3", "F32" ...), headers only."""
    return {key: dtype for key, (dtype, _) in checkpoint_headers(files).items()}


def stored_layout(
    fmt: StoredFormat, files: list[Path], keymap: KeyMap, wrapper: Wrapper | None = None
) -> tuple[StoredFormat, set[str]]:
    """The format completed from the checkpoint's headers, and the native names it stores (a
    multimodal ``wrapper``'s keys renamed to its text model's first)."""
    dtypes = _text_keys(checkpoint_dtypes(files), wrapper)
    fmt = fmt.with_header(dtypes)
    return fmt, stored_names(fmt, dtypes, keymap)


def stored_names(fmt: StoredFormat, dtypes: dict[str, str], keymap: KeyMap) -> set[str]:
    """Native weight names the checkpoint stores in ``fmt``: those with a scale tensor.

    Raises:
        CheckpointError: a float8 weight without scales (its values would be read as if unscaled), or
            no scales at all.
    """
    names = set()
    dtypes = {key: dtype for key, dtype in dtypes.items() if not keymap.skipped(key)}  # MTP layers are not built
    for key in dtypes:
        if key.endswith(fmt.marker):
            weight = key[: -len(fmt.marker)]
            missing = [weight + suffix for suffix in fmt.needs if weight + suffix not in dtypes]
            if missing:
                raise CheckpointError(f"checkpoint has '{key}' but no tensor '{missing[0]}' beside it")
            names.add(keymap.target(weight).name)
    for key, dtype in dtypes.items():
        if dtype.startswith("F8") and not (fmt.method == "fp8" and key + fmt.marker in dtypes):
            raise CheckpointError(f"checkpoint tensor '{key}' is {dtype} but has no '{key}{fmt.marker}' scales")
    if not names:
        raise CheckpointError(
            f"config.json declares quant_method '{fmt.method}', but no checkpoint tensor has a '{fmt.marker}' "
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
        elif isinstance(module, GroupedExperts) and {dot + "gate_up_proj", dot + "down_proj"} & left:
            if not {dot + "gate_up_proj", dot + "down_proj"} <= left:
                raise CheckpointError(f"'{path}': the checkpoint stores some projections in {fmt.method}, not all")
            problem = fmt.experts_problem(module.hidden)
            if problem:
                raise CheckpointError(f"'{path}': {problem}, so the fused gate/up scales cannot be stacked")
            left.difference_update({dot + "gate_up_proj", dot + "down_proj"})
            dtype = module.gate_up_proj.dtype
            model.set_submodule(path, stored_experts(module, lambda shape: fmt.holder(shape, dtype)))
