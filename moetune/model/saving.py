"""Write a native model as a Hugging Face checkpoint folder that transformers loads.

Expert tensors are written per expert, the layout transformers 5 itself writes, so any version
that reads its own checkpoints reads ours. Files are written to a temporary folder next to the
destination and moved into place only when complete: an interrupted save never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..outputs import write_folder
from .hf import KeyMap
from .quant import quantized_weights
from .requantize import Requantize

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def native_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Base-model parameters under their native names, looking through adapter wrappers.

    An adapter wrapper is any module with a ``base_layer`` and an ``adapter_params()`` method; its
    own parameters are skipped and the wrapped layer's are reported under the wrapper's name.
    """
    out: dict[str, torch.Tensor] = {}
    if hasattr(model, "base_layer") and callable(getattr(model, "adapter_params", None)):
        return native_state_dict(model.base_layer, prefix)
    for name, p in model.named_parameters(recurse=False):
        out[prefix + name] = p
    for name, holder in quantized_weights(model, recurse=False).items():  # stored base: written dequantized
        out[prefix + name] = holder.dequantize()
    for name, child in model.named_children():
        out.update(native_state_dict(child, f"{prefix}{name}."))
    return out


def checkpoint_tensors(
    model: nn.Module, family: str, *, tied: bool, requantize: Requantize | None = None
) -> dict[str, torch.Tensor]:
    """Checkpoint key -> tensor; the weights ``requantize`` names are written back in its format."""
    keymap = KeyMap(family)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in native_state_dict(model).items():
        if tied and name == "lm_head.weight":
            continue
        for key, t in keymap.export(name, tensor.detach()):
            parts = requantize.tensors(key, t) if requantize and name in requantize.names else {key: t}
            tensors.update({k: v.to("cpu").contiguous() for k, v in parts.items()})
    return tensors


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    return shards


# Files that make a model folder usable beyond its weights: tokenizer, chat template, generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)


def companion_files(
    folder: str | os.PathLike | None, names: tuple[str, ...] = TOKENIZER_FILES + GENERATION_FILES
) -> dict[str, Path]:
    """Those of ``names`` present in ``folder`` (name -> path); none when ``folder`` is None."""
    if folder is None:
        return {}
    return {n: Path(folder) / n for n in names if (Path(folder) / n).is_file()}


def save_pretrained(
    model,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 2**30,
    overwrite: bool = False,
    inputs: tuple = (),
    extra_files: dict[str, Path] | None = None,
    requantize: Requantize | None = None,
) -> Path:
    """Write config.json and safetensors shards (with an index when sharded) to ``out_dir``.

    ``out_dir`` must be new, empty, or a model folder moetune wrote (see :mod:`moetune.outputs`).
    ``extra_files`` (name -> source file, copied beside the weights) defaults to the tokenizer,
    chat template and generation config of the folder the model was loaded from, so the written
    folder tokenizes and generates as the original did. ``requantize`` (``moetune merge --requantize``)
    writes the weights a stored base held back in its format, config.json's quantization_config kept;
    the largest error of doing so is logged.
    """
    if extra_files is None:
        extra_files = companion_files(getattr(model, "source_path", None))
    args = model.args
    tensors = checkpoint_tensors(model, args.family, tied=args.tie_word_embeddings, requantize=requantize)
    shards = _shards(tensors, max_shard_size)

    def write(tmp: Path) -> None:
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {k: n for n, s in zip(names, shards) for k in s},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(_config(args.hf_config, tensors, requantize), indent=2))
        for name, source in extra_files.items():
            shutil.copyfile(source, tmp / name)

    out = write_folder(out_dir, "model", write, overwrite=overwrite, inputs=inputs)
    if requantize is not None:
        requantize.report()
    return out


def _config(hf_config: dict, tensors: dict[str, torch.Tensor], requantize: Requantize | None) -> dict:
    config = dict(hf_config)
    config["dtype"] = DTYPE_NAMES.get(next(t.dtype for t in tensors.values() if t.dtype.itemsize > 1), "float32")
    config.pop("torch_dtype", None)
    if requantize is None:
        config.pop("quantization_config", None)  # a stored-format base is written dequantized
    return config
