"""Load a Hugging Face checkpoint folder into a native model, and write one back.

Loading builds the model on the meta device, allocates each tensor once on the target device
(``to_empty``), then copies checkpoint tensors in from memory-mapped safetensors one at a time,
so the weights never exist twice. Every native tensor must be filled exactly, and every
checkpoint tensor must land somewhere: anything else is an error that names the tensor.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError
from ..safetensors_check import check_safetensors
from .build import build_causal_lm
from .config import ModelArgs
from .families import model_args_from_hf
from .hf import KeyMap, checkpoint_shape, destination, from_checkpoint
from .layers import RMSNorm
from .nf4_weight import NF4Weight
from .quant import quantize_model, quantized_weights
from .transformer import CausalLM

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_hf_config(path: str | os.PathLike) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder '{folder}' does not exist or is not a folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"'{folder}' has no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def weight_files(folder: Path) -> list[Path]:
    """Safetensors files of a checkpoint (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard '{missing[0]}', which is not in {folder}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"'{folder}' holds only pickled weights ({pickles[0]}); moetune reads safetensors only, because "
            "unpickling a file can run arbitrary code. Convert it once with transformers: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise CheckpointError(f"'{folder}' has no *.safetensors weights")


class _Filler:
    """Copies checkpoint tensors into native ones and tracks what was filled."""

    def __init__(self, model: nn.Module, keymap: KeyMap, *, tied: bool) -> None:
        # 4-bit weights (quantize="nf4") are filled through their holders, under the same names.
        self.params = {**dict(model.named_parameters()), **quantized_weights(model)}
        self.keymap = keymap
        self.tied = tied
        self.filled: dict[str, set] = {name: set() for name in self.params}
        self.skipped = 0

    def fill(self, key: str, tensor: torch.Tensor, file: Path) -> None:
        if self.keymap.skipped(key):
            self.skipped += 1
            return
        target = self.keymap.target(key)
        if target.name not in self.params:
            if self.keymap.ignored(key) or (self.tied and key == "lm_head.weight"):
                return
            raise CheckpointError(
                f"{file.name}: tensor '{key}' is not part of a {self.keymap.family} model (unexpected key)"
            )
        native = self.params[target.name]
        if target.expert is not None and target.expert >= native.shape[0]:
            raise CheckpointError(
                f"{file.name}: tensor '{key}' names expert {target.expert}, but the config has {native.shape[0]} "
                "experts"
            )
        quantized = isinstance(native, NF4Weight)
        dest = destination(native.layout() if quantized else native.data, target)
        expected = checkpoint_shape(dest, target.layout)
        if expected != tuple(tensor.shape):
            raise CheckpointError(
                f"{file.name}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {expected} from config.json"
            )
        if target.layout is not None:
            tensor = from_checkpoint(tensor, target.layout)
        if quantized:  # quantized now, so full-precision weights never accumulate
            native.write(dest.storage_offset(), tensor)
        else:
            dest.copy_(tensor.to(dest.dtype))
        self.filled[target.name].add((target.expert, target.part))

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


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield file, key, f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> CausalLM:
    """Load a Hugging Face causal-LM folder (config.json + safetensors) as a native model.

    Args:
        path: local model folder.
        dtype: parameter dtype.
        device: where the weights are allocated.
        quantize: None, or "nf4" for 4-bit base weights: every linear but the LM head and the
            routers, and every routed-expert weight (see :mod:`moetune.model.quant`).

    Returns:
        A :class:`CausalLM` in eval mode.
    """
    if quantize not in (None, "nf4"):
        raise CheckpointError(f"quantize={quantize!r} is not supported (allowed: None, 'nf4')")
    folder = Path(path)
    cfg = read_hf_config(folder)
    _refuse_prequantized(cfg, folder / "config.json")
    args = model_args_from_hf(cfg, where=str(folder / "config.json"))
    files = weight_files(folder)
    for file in files:  # header and size of every shard, before anything is built
        check_safetensors(file)
    with torch.device("meta"):
        model = build_causal_lm(args)
    model.to(dtype=dtype)
    if quantize == "nf4":
        quantize_model(model)  # on meta: empty 4-bit holders, filled tensor by tensor below
    model.to_empty(device=device)
    _after_materialise(model)
    mtp = range(args.num_layers, args.num_layers + args.mtp_layers)
    filler = _Filler(model, KeyMap(args.family, skipped_layers=mtp), tied=args.tie_word_embeddings)
    for file, key, tensor in iter_checkpoint(files):
        filler.fill(key, tensor, file)
    filler.check_complete()
    if filler.skipped:
        log.info(
            "skipped %d tensors of the multi-token-prediction layer(s) %s (num_nextn_predict_layers=%d): "
            "moetune builds and trains the main model only",
            filler.skipped,
            ", ".join(f"model.layers.{i}" for i in mtp),
            args.mtp_layers,
        )
    model.source_path = str(folder)
    return model.eval()


def _refuse_prequantized(cfg: dict, where: Path) -> None:
    """Checkpoints stored quantized (DeepSeek-V3's FP8 release, GPTQ, AWQ ...) hold scales next to
    their weights; reading the raw values as if they were the weights would be silently wrong."""
    quant = cfg.get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    hint = (
        " Convert it to bf16 first (for DeepSeek-V3/R1: DeepSeek's inference/fp8_cast_bf16.py)."
        if method == "fp8"
        else " Use the unquantized (bf16/fp16/fp32) checkpoint."
    )
    raise CheckpointError(
        f"{where}: the weights are stored quantized (quantization_config.quant_method "
        f"'{method}'), which moetune does not load; for 4-bit training load a bf16 checkpoint "
        f"with quantize='nf4'.{hint}"
    )


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
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
