"""Load a Hugging Face checkpoint folder into a native model, and write one back.

Loading builds the model on the meta device, allocates each tensor once on the target device
(``to_empty``), then copies checkpoint tensors in from memory-mapped safetensors one at a time,
so the weights never exist twice. Every native tensor must be filled exactly, and every
checkpoint tensor must land somewhere: anything else is an error that names the tensor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..safetensors_check import check_safetensors
from .build import build_causal_lm
from .config import ModelArgs
from .hf import KeyMap, Target, checkpoint_shape, destination, from_checkpoint
from .layers import RMSNorm
from .model_folder import CheckpointTensor, iter_checkpoint, model_args_from_folder, read_hf_config, weight_files
from .prequantized import folder_format, stored_layout, stored_to_nf4, swap_stored_modules
from .quant import StoredWeight, cpu_workers, quantize_model, quantized_weights
from .quant.stored import copy_rows
from .transformer import CausalLM
from .wrappers import Wrapper, unwrap_config

log = logging.getLogger(__name__)


class _Filler:
    """Copies checkpoint tensors into native ones and tracks what was filled."""

    def __init__(
        self, model: nn.Module, keymap: KeyMap, *, tied: bool, wrapper: Wrapper | None = None, shard=None
    ) -> None:
        self.params: dict[str, torch.Tensor | StoredWeight] = dict(model.named_parameters())
        self.stored: dict[str, tuple[StoredWeight, str]] = {}  # buffers read as released -> (holder, suffix)
        self.suffixes: set[str] = set()
        self.checks: dict[str, StoredWeight] = {}  # tensors that describe a stored weight: checked, not held
        for name, holder in quantized_weights(model).items():
            for suffix in holder.checked_suffixes():
                self.checks[name + suffix] = holder
                self.suffixes.add(suffix)
            parts = holder.checkpoint_tensors()
            if parts and shard is not None:  # read as stored: this rank's rows only (an FSDP load)
                holder.load_rows_of(*shard)
            if not parts:  # quantized while loading (quantize="nf4"): filled through the holder
                self.params[name] = holder
            for suffix, buffer in parts.items():  # e.g. FP8: "" -> weight, "_scale_inv" -> scales
                self.params[name + suffix] = buffer
                self.stored[name + suffix] = (holder, suffix)
                self.suffixes.add(suffix)
        self.suffixes.discard("")
        self.keymap = keymap
        self.tied = tied
        self.wrapper = wrapper
        self.filled: dict[str, set] = {name: set() for name in self.params}
        self.skipped = 0  # tensors of multi-token-prediction layers
        self.skipped_parts = 0  # tensors of a wrapper's parts that are not the text model

    def _target(self, key: str) -> tuple[Target, str]:
        """Where a key goes, and the name it fills: a weight's scales (``<weight key>_scale_inv``)
        follow the weight's own key map, into the holder's scale buffer."""
        for suffix in self.suffixes:
            if key.endswith(suffix):
                base = self.keymap.target(key[: -len(suffix)])
                if base.name + suffix in self.params or base.name + suffix in self.checks:
                    return base, base.name + suffix
        target = self.keymap.target(key)
        return target, target.name

    def fill(self, key: str, entry: CheckpointTensor, file: Path) -> None:
        shown = f"{file.name}: tensor '{key}'"  # errors name the file's key (a wrapper's prefix included)
        if self.wrapper is not None:
            text_key = self.wrapper.text_key(key)
            if text_key is None:
                self.skipped_parts += 1
                return
            key = text_key
        if self.keymap.skipped(key):
            self.skipped += 1
            return
        target, name = self._target(key)
        if name in self.checks:
            return self._check(name, target, entry.read(), shown)
        if name not in self.params:
            if self.keymap.ignored(key) or (self.tied and key == "lm_head.weight"):
                return
            raise CheckpointError(f"{shown} is not part of a {self.keymap.family} model (unexpected key)")
        native = self.params[name]
        if target.expert is not None and target.expert >= native.shape[0]:
            raise CheckpointError(f"{shown} names expert {target.expert}, but the config has {native.shape[0]} experts")
        quantized = isinstance(native, StoredWeight)
        dest = destination(native.layout() if quantized else native.data, target)
        layout = None if name in self.stored else target.layout  # stored buffers have the checkpoint's shape
        expected = checkpoint_shape(dest, layout)
        if expected != entry.shape:
            raise CheckpointError(f"{shown} has shape {entry.shape}, expected {expected} from config.json")
        if name in self.stored and not self.stored[name][0].keeps(target.expert, native.shape[0]):
            self.filled[name].add((target.expert, target.part))  # an expert another rank keeps: not read here
            return
        tensor = entry.read()
        if layout is not None:
            tensor = from_checkpoint(tensor, layout)
        if quantized:  # quantized now, so full-precision weights never accumulate
            native.write(dest.storage_offset(), tensor)
        else:
            value = self._converted(name, target, tensor, dest.dtype, shown)
            copy_rows(native, dest, value, self.stored[name][0].shard if name in self.stored else None)
        self.filled[name].add((target.expert, target.part))

    def _check(self, name: str, target: Target, tensor: torch.Tensor, what: str) -> None:
        expected = tuple(destination(self.checks[name].layout(), target).shape)
        if tuple(tensor.tolist()) != expected:
            raise CheckpointError(f"{what} says {tuple(tensor.tolist())}, expected {expected} from config.json")

    def _converted(self, name: str, target: Target, tensor: torch.Tensor, dtype: torch.dtype, what: str):
        """``tensor`` in ``dtype``: stored tensors are copied as they are (or converted exactly), and a
        float8 tensor is never read as a plain weight."""
        if name in self.stored:
            if target.layout is not None:  # the family permutes this weight: the holder knows its bytes
                holder, suffix = self.stored[name]
                tensor = holder.from_checkpoint(suffix, tensor, target.layout)
            if tensor.dtype == dtype or (tensor.dtype, dtype) in _EXACT:
                return tensor.to(dtype)
            raise CheckpointError(f"{what} is {tensor.dtype}, expected {dtype} for a stored weight")
        if tensor.dtype.itemsize == 1 and tensor.is_floating_point():
            raise CheckpointError(f"{what} is {tensor.dtype}, but config.json has no quantization_config to scale it")
        return tensor.to(dtype)

    def check_complete(self) -> None:
        for name, parts in self.filled.items():
            if parts == {(None, "all")} or _covers(self.params[name], parts):
                continue
            raise CheckpointError(
                f"checkpoint has no tensor for '{name}' ({_describe_missing(self.params[name], parts)})"
            )


def _covers(param: torch.Tensor, parts: set) -> bool:
    if not parts:
        return False
    if (None, "all") in parts:
        return True
    experts = range(param.shape[0])
    return all((e, "all") in parts or {(e, "gate"), (e, "up")} <= parts for e in experts)


def _describe_missing(param: torch.Tensor, parts: set) -> str:
    if not parts:
        return "missing key"
    have = sorted({e for e, _ in parts if e is not None})
    return f"experts filled: {len(have)} of {param.shape[0]}"


# Stored tensors are copied as they are; the only conversion allowed is an exact one.
_EXACT = {(torch.float8_e8m0fnu, torch.float32)}  # power-of-two scales (scale_fmt "ue8m0")


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    *,
    shard: tuple[int, int] | None = None,
) -> CausalLM:
    """Load a Hugging Face causal-LM folder (config.json + safetensors) as a native model.

    Args:
        path: local model folder.
        dtype: parameter dtype.
        device: where the weights are allocated.
        quantize: None, or "nf4" for 4-bit base weights: every linear but the LM head and the
            routers, and every routed-expert weight (see :mod:`moetune.model.quant`).
        shard: (rank, world) of an FSDP run: the weights read as stored get only the rows FSDP2
            will keep on this rank, and dequantize only once sharded (``StoredWeight.sharded``).

    A folder released quantized (``quantization_config``: block-scaled FP8, pack-quantized INT4,
    MXFP4 experts) is read as stored: its quantized weights stay in that form on ``device`` and are
    dequantized to ``dtype`` for each matmul (:mod:`moetune.model.prequantized`); with
    ``quantize="nf4"`` they are turned into NF4 after loading (with a warning: two roundings).

    Returns:
        A :class:`CausalLM` in eval mode.
    """
    if quantize not in (None, "nf4"):
        raise CheckpointError(f"quantize={quantize!r} is not supported (allowed: None, 'nf4')")
    folder = Path(path)
    cfg, wrapper = unwrap_config(read_hf_config(folder), where=str(folder / "config.json"))
    fmt = folder_format(cfg, folder, quantize)
    args = model_args_from_folder(folder)
    files = weight_files(folder)
    for file in files:  # header and size of every shard, before anything is built
        check_safetensors(file)
    mtp = range(args.num_layers, args.num_layers + args.mtp_layers)
    keymap = KeyMap(args.family, skipped_layers=mtp)
    stored = None if fmt is None else stored_layout(fmt, files, keymap, wrapper)
    model = _allocate(args, dtype, device, quantize if fmt is None else None, stored)
    shard = shard if quantize is None else None  # nf4 from a stored folder dequantizes it whole first
    filler = _Filler(model, keymap, tied=args.tie_word_embeddings, wrapper=wrapper, shard=shard)
    _fill_all(filler, files)
    filler.check_complete()
    _report_skipped(filler, args, mtp)
    if fmt is not None and quantize == "nf4":  # read as stored first: 1.0-1.5 bytes per weight at the peak
        stored_to_nf4(model)
    model.source_path = str(folder)
    return model.eval()


def _fill_all(filler: _Filler, files: list[Path]) -> None:
    """Every checkpoint tensor into the model. The NF4 quantizer's CPU workers, if it started them,
    stop afterwards: their threads and per-thread buffers are not needed once the model is loaded."""
    try:
        for file, key, entry in iter_checkpoint(files):
            filler.fill(key, entry, file)
    finally:
        cpu_workers.shutdown()


def _report_skipped(filler: _Filler, args: ModelArgs, mtp: range) -> None:
    """One log line per kind of checkpoint part left out by rule: a wrapper's vision parts, MTP layers."""
    if filler.skipped_parts:
        log.info(
            "skipped %d tensors of the %s model's vision parts (%s): moetune loads and fine-tunes its text model only",
            filler.skipped_parts,
            args.wrapper,
            ", ".join(filler.wrapper.skipped),
        )
    if filler.skipped:
        log.info(
            "skipped %d tensors of the multi-token-prediction layer(s) %s (num_nextn_predict_layers=%d): "
            "moetune builds and trains the main model only",
            filler.skipped,
            ", ".join(f"model.layers.{i}" for i in mtp),
            args.mtp_layers,
        )


def _allocate(args: ModelArgs, dtype, device, quantize: str | None, stored: tuple | None) -> CausalLM:
    """The model with every tensor allocated once on ``device``: built on meta, holders of the
    stored format swapped in where ``stored`` (format, native names) says, or NF4 holders."""
    with torch.device("meta"):
        model = build_causal_lm(args)
    model.to(dtype=dtype)
    if stored:  # on meta: empty holders of the stored format, filled byte for byte below
        swap_stored_modules(model, *stored)
    if quantize == "nf4":
        quantize_model(model)  # on meta: empty 4-bit holders, filled tensor by tensor below
    model.to_empty(device=device)
    _after_materialise(model)
    return model


def _after_materialise(model: CausalLM) -> None:
    """Recompute buffers lost by ``to_empty`` and re-tie shared weights."""
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    model.tie_weights()


def build_random_model(
    args: ModelArgs, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, std: float = 0.02
) -> CausalLM:
    """A model with N(0, std) weights (norms at 1), for tests, the demo and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = build_causal_lm(args)
    model.to(dtype=dtype).to_empty(device=device)
    _after_materialise(model)
    norms = {id(m.weight): m.neutral_weight for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.fill_(norms[id(p)])
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
