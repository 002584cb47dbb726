"""The neutral folder layer every adapter file format writes and reads through.

An adapter folder holds ``adapter_config.json``, ``adapter_model.safetensors`` and, for folders
moetune writes, ``moetune_adapter.json`` (moetune's metadata, kept out of the config because PEFT
warns about every key its config class does not know). Folders are written to a temporary folder
and moved into place when complete (:func:`moetune.outputs.write_folder`), so an existing folder
is never half overwritten. Pickled adapters (``adapter_model.bin``) are refused on reading; one is
written only for MoE-PEFT, which reads nothing else, beside the safetensors file (``pickle_copy``).

Folders of earlier moetune versions carry the metadata inside ``adapter_config.json`` under
``moetune``; it is read from there when no ``moetune_adapter.json`` exists. The sidecar records a
fingerprint of the config it was written with (:func:`~.peft_meta.config_fingerprint`); when
``adapter_config.json`` was later rewritten (PEFT's ``save_pretrained`` into the same folder, a
hand edit) so that targets, ranks or dropout no longer match, the sidecar is ignored with a
warning and the PEFT config wins. Sidecars without a fingerprint are trusted.

What the files mean is each format's business (:mod:`.peft`, :mod:`.per_expert`, :mod:`.adalora`,
:mod:`.mixtures`, :mod:`.moe_peft`); :mod:`.adapters` chooses the format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from ...errors import AdapterError
from ...outputs import write_folder
from ...safetensors_check import check_safetensors
from .peft_meta import FINGERPRINT_KEY, config_fingerprint, split_meta

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "PICKLE_FILE",
    "WEIGHTS_FILE",
    "adapter_files",
    "read_adapter_config",
    "read_json",
    "read_tensors",
    "write_adapter_folder",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
META_FILE = "moetune_adapter.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
log = logging.getLogger(__name__)


def write_adapter_folder(
    out: Path,
    tensors: dict[str, torch.Tensor],
    cfg: dict,
    *,
    meta: dict | None = None,
    overwrite: bool = False,
    inputs: tuple = (),
    pickle_copy: bool = False,
) -> Path:
    """Write the folder's files (``meta``: moetune's metadata, to :data:`META_FILE`, with the
    fingerprint of ``cfg``; ``pickle_copy``: the tensors also as :data:`PICKLE_FILE`, written with
    ``torch.save``, never read) as one folder output (see :func:`moetune.outputs.write_folder`), so
    the files always belong together and nothing moetune did not write is touched."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if pickle_copy:
            torch.save(tensors, tmp / PICKLE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if meta is not None:
            (tmp / META_FILE).write_text(
                json.dumps({**meta, FINGERPRINT_KEY: config_fingerprint(cfg)}, indent=2) + "\n"
            )

    return write_folder(out, "adapter", write, overwrite=overwrite, inputs=inputs)


def _what_it_is(folder: Path) -> str:
    """A hint for a folder without an adapter config: adapters one level down (PEFT saves several
    adapters as subfolders), or a training checkpoint under another name."""
    inside = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    if inside:
        return f"; it holds adapter folders ({', '.join(inside[:4])}): give one of them"
    if (folder / "trainer_state.pt").is_file() or any(folder.glob("adapter-*.safetensors")):
        return (
            "; it looks like a training checkpoint: give it under the name the run wrote "
            "(checkpoints/checkpoint-NNNNNNNN, beside its run's moetune_run.yaml), or the run's adapter folder"
        )
    return ""


def adapter_files(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise AdapterError(f"adapter folder '{folder}' does not exist or is not a folder")
    cfg, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg.is_file():
        raise AdapterError(f"'{folder}' has no {CONFIG_FILE} (expected a PEFT adapter folder){_what_it_is(folder)}")
    if weights.is_file():
        return cfg, weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"'{folder}' holds only a pickled adapter ({pickles[0]}); moetune reads safetensors only, because "
            "unpickling a file can run arbitrary code. Convert it once with PEFT: "
            "PeftModel.from_pretrained(base, path).save_pretrained(out) writes adapter_model.safetensors"
        )
    raise AdapterError(f"'{folder}' has no {WEIGHTS_FILE}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_adapter_config(cfg_file: Path) -> tuple[Any, dict | None]:
    """An adapter folder's PEFT config and moetune's metadata: :data:`META_FILE` beside it when
    present and written for this config, else what an earlier moetune embedded in the config
    (taken out of the config)."""
    raw, legacy = split_meta(read_json(cfg_file))
    meta_file = cfg_file.with_name(META_FILE)
    if not meta_file.is_file():
        return raw, legacy
    meta = _read_meta(meta_file)
    if _stale(meta, raw):
        log.warning(
            "%s was written for another %s (it was rewritten since, e.g. by PEFT's save_pretrained, or edited); "
            "ignoring it: the targets and ranks in %s apply",
            meta_file,
            CONFIG_FILE,
            CONFIG_FILE,
        )
        return raw, legacy
    return raw, meta


def _stale(meta: dict, raw: Any) -> bool:
    """Whether the sidecar records a fingerprint that ``raw`` no longer has (none recorded: trusted)."""
    recorded = meta.get(FINGERPRINT_KEY)
    return recorded is not None and isinstance(raw, dict) and recorded != config_fingerprint(raw)


def _read_meta(path: Path) -> dict:
    expected = (
        'a JSON object with moetune\'s adapter metadata, e.g. {"adapter_name": ..., "layout": ..., '
        '"lora_config": {...}} (delete the file to load the folder from adapter_config.json alone)'
    )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc}); expected {expected}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: found {json.dumps(meta)[:60]}; expected {expected}")
    bad = next((k for k in ("lora_config", "merged") if k in meta and not isinstance(meta[k], dict)), None)
    if bad is not None:
        raise AdapterError(f"{path}: '{bad}' is {meta[bad]!r}, not an object; expected {expected}")
    return meta


def read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    check_safetensors(weights, error=AdapterError)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise AdapterError(f"{weights}: cannot read safetensors file ({exc})") from None
