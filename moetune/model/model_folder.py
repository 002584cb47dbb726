"""A Hugging Face model folder before any weight is read: its config.json, the architecture it
describes (a multimodal wrapper's text model included) and its safetensors files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .config import ModelArgs
from .families import model_args_from_hf
from .wrappers import unwrap_config

__all__ = ["model_args_from_folder", "read_hf_config", "weight_files"]

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


def model_args_from_folder(folder: str | os.PathLike) -> ModelArgs:
    """:class:`ModelArgs` of a model folder's config.json; a multimodal wrapper's (see
    :mod:`.wrappers`) gives its text model's, with ``args.wrapper`` naming the wrapper."""
    where = str(Path(folder) / "config.json")
    cfg, wrapper = unwrap_config(read_hf_config(folder), where=where)
    args = model_args_from_hf(cfg, where=where)
    args.wrapper = wrapper.model_type if wrapper is not None else None
    return args


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


class CheckpointTensor:
    """One tensor of an open safetensors file: its shape from the header, its values read on demand
    (a rank of a sharded load reads only the experts it keeps)."""

    def __init__(self, handle, key: str, file: Path) -> None:
        self.handle, self.key, self.file = handle, key, file

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(self.key).get_shape())

    def read(self) -> torch.Tensor:
        try:
            return self.handle.get_tensor(self.key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.file}: cannot read tensor '{self.key}' ({exc})") from None


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[Path, str, CheckpointTensor]]:
    """(file, key, tensor) for every tensor of ``files``, each valid until the next is yielded."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield file, key, CheckpointTensor(f, key, file)
        except (SafetensorError, OSError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
