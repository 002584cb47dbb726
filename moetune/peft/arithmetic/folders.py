"""``moetune merge-adapters``: combine adapter folders of one base model into a new PEFT folder.

Each input folder is first loaded onto a weightless (meta-device) skeleton of the base model with
:func:`~moetune.peft.formats.adapters.load_adapter`, so an adapter for another model fails exactly as loading it
would (naming the file and the tensor), and so each module's scaling is the one moetune and PEFT
apply (``alpha / r``, rsLoRA, rank and alpha patterns). A folder in PEFT's AdaLoRA layout (the
``adalora/`` folder of an AdaLoRA run) is read as its equivalent plain LoRA, as loading reads it,
which is also what the run writes at the top of its adapter folder. Then:

- the adapters must adapt the same modules with the same shapes (rank aside): otherwise one
  error names the first tensor that differs;
- the tensors are merged by :func:`~.combine.combine_adapters` (PEFT's
  ``add_weighted_adapter`` semantics); an adapter whose modules have different scalings has them
  folded into its A matrices first (exact for the delta methods);
- the result is written with scaling 1 (``lora_alpha = r`` per module), checked by loading it onto
  the skeleton again, and moved into place only when complete.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterError
from ...outputs import check_output
from ...model.build import build_causal_lm
from ...model.loading import model_args_from_folder
from ...model.moe import GroupedExperts
from ..core.inject import delete_adapter
from ..core.layer import adapter_layers
from ..formats.adapters import load_adapter
from ..formats.folder import write_adapter_folder
from ..formats.peft import add_adapter_from, read_adapter_folder
from ..formats.peft_config import PREFIX
from ..formats.wrapper_paths import to_file
from ..lora.experts import LoraGroupedExperts
from ..lora.experts_layout import peft_prefixes
from ..lora.linear import LoraLinear
from .combine import METHODS, combine_adapters, is_experts_prefix


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    ranks: dict[str, int]  # module key prefix -> merged rank

    def summary(self) -> str:
        counts = Counter(self.ranks.values())
        ranks = ", ".join(f"rank {r} x{n}" for r, n in sorted(counts.items()))
        return f"merged adapter written to {self.out_dir} (method {self.method}; {len(self.ranks)} modules: {ranks})"


def skeleton(model_path: str | os.PathLike) -> nn.Module:
    """The base model's modules on the meta device (shapes, no weights, nothing read but config.json)."""
    args = model_args_from_folder(model_path)
    with torch.device("meta"):
        model = build_causal_lm(args)
    model.source_path = str(model_path)
    return model


def module_scalings(model: nn.Module, name: str) -> dict[str, float]:
    """File key prefix (``base_model.model.<path>.[base_layer.]``) -> scaling of adapter ``name``."""
    out = {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        if isinstance(layer, LoraLinear) and layer.plain_pair(name):
            out[f"{PREFIX}{path}."] = layer.scaling[name]
        elif isinstance(layer, LoraGroupedExperts):
            for param, prefix in peft_prefixes(layer.targeted_params([name])).items():
                out[f"{PREFIX}{path}.{prefix}"] = layer.scaling(name, param)
        else:
            raise AdapterError(f"{path}: a {type(layer).__name__} adapter cannot be merged (plain LoRA pairs only)")
    return out


def _check_same_targets(states: list[dict[str, torch.Tensor]], names: list[str]) -> None:
    """Same keys and, rank aside, same shapes in every adapter; else name the first difference."""
    ref, ref_name = states[0], names[0]
    for state, name in zip(states[1:], names[1:]):
        for key in sorted(set(ref) | set(state)):
            if key not in state or key not in ref:
                has, lacks = (ref_name, name) if key not in state else (name, ref_name)
                raise AdapterError(
                    f"tensor '{key}' is in adapter {has} but not in {lacks}: the adapters adapt different "
                    "modules (merge adapters trained with the same targets on the same base)"
                )
            a, b = ref[key].shape, state[key].shape
            fixed = 1 if key.endswith("lora_A.weight") else 0  # A (r, in): `in` must match; B (out, r): `out`
            if len(a) != len(b) or a[fixed] != b[fixed]:
                raise AdapterError(
                    f"tensor '{key}' has shape {tuple(b)} in adapter {name} but {tuple(a)} in {ref_name}: "
                    "the adapters were trained on different base models"
                )


def _fold_scalings(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> tuple[dict[str, torch.Tensor], float]:
    """(state, s) for combine_adapters: s itself when every module shares it, else A's times s_module and 1."""
    values = set(scalings.values())
    if len(values) == 1:
        return state, values.pop()
    out = dict(state)
    for prefix, s in scalings.items():
        out[f"{prefix}lora_A.weight"] = state[f"{prefix}lora_A.weight"] * s
    return out, 1.0


def combine_adapter_folders(
    model_path: str | os.PathLike,
    adapters: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    weights: list[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> MergeResult:
    """Merge PEFT adapter folders trained on ``model_path`` into one folder at ``out_dir``.

    Args:
        adapters: two or more adapter folders (PEFT's LoRA or AdaLoRA layout, ours or PEFT's own).
        weights: one per adapter (default 1.0 each: the task vectors add up).
        method, density, rank, seed: as :func:`~.combine.combine_adapters`.
        overwrite: write into a non-empty folder moetune did not write, beside its files.

    Raises:
        AdapterError: an unreadable folder, an adapter for another model, adapters with different
            targets (naming the first tensor that differs), or bad merge options.
    """
    if len(adapters) < 2:
        raise AdapterError(f"merge-adapters needs at least two adapters, got {len(adapters)}")
    check_output(out_dir, "adapter", overwrite=overwrite, inputs=[model_path, *adapters])  # before any work
    if method not in METHODS:
        raise AdapterError(f"method {method!r} is not a merge method (allowed: {', '.join(METHODS)})")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise AdapterError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    model = skeleton(model_path)
    states, scalings, raw = _read_adapters(model, adapters)
    _check_same_targets(states, [str(a) for a in adapters])
    num_experts = _routed_expert_count(model)
    merged = combine_adapters(
        states, weights, method, density=density, rank=rank, seed=seed, scalings=scalings, num_experts=num_experts
    )
    cfg, ranks = _merged_config(raw[0], merged, num_experts or 1)
    info = {
        "method": method,
        "weights": weights,
        "density": density,
        "rank": rank,
        "sources": [str(a) for a in adapters],
    }
    out = _write_checked(model, Path(out_dir), merged, cfg, info, overwrite=overwrite, inputs=(model_path, *adapters))
    return MergeResult(out_dir=out, method=method, ranks=ranks)


def _read_adapters(
    model: nn.Module, adapters: list[str | os.PathLike]
) -> tuple[list[dict[str, torch.Tensor]], list[float], list[dict]]:
    """Per folder: its tensors with scalings folded as needed, its scaling, its config as plain LoRA.

    Each is loaded onto ``model`` (the skeleton) and removed again, so an adapter for another model
    fails as loading it would, naming the tensor."""
    states, scalings, raw = [], [], []
    for i, folder in enumerate(adapters):
        files = read_adapter_folder(Path(folder))  # its config as plain LoRA, without moetune's metadata
        add_adapter_from(model, files, name=f"merge{i}")  # validates against the base, naming the tensor
        state, s = _fold_scalings(files.tensors, module_scalings(model, f"merge{i}"))
        delete_adapter(model, f"merge{i}")
        states.append(state)
        scalings.append(s)
        raw.append(files.raw)
    return states, scalings, raw


def _routed_expert_count(model: nn.Module) -> int | None:
    """The one routed-expert count of ``model``'s MoE layers (None for a dense model)."""
    counts = {m.num_experts for m in model.modules() if isinstance(m, GroupedExperts)}
    if len(counts) > 1:
        raise AdapterError(f"merging needs one routed-expert count across layers, this model has {sorted(counts)}")
    return counts.pop() if counts else None


def _write_checked(
    model: nn.Module,
    out_dir: Path,
    merged: dict[str, torch.Tensor],
    cfg: dict,
    info: dict,
    *,
    overwrite: bool,
    inputs: tuple,
) -> Path:
    """Write the merged folder, then load it onto ``model``: the result must load like any adapter.
    Merging runs on the text model's module paths; the folder names a multimodal wrapper's."""
    merged, cfg = to_file(model, merged, cfg)
    out = write_adapter_folder(
        out_dir,
        {k: v.contiguous() for k, v in merged.items()},
        cfg,
        meta={"merged": info},
        overwrite=overwrite,
        inputs=inputs,
    )
    try:
        load_adapter(model, out, name="merged")
    except AdapterError:
        raise AdapterError(f"internal error: the merged adapter written to {out} does not load") from None
    return out


def _merged_config(first: dict, merged: dict[str, torch.Tensor], num_experts: int) -> tuple[dict, dict[str, int]]:
    """The first adapter's config with the merged ranks, scaling 1 per module (alpha = r)."""
    ranks: dict[str, int] = {}
    for key, a in merged.items():
        if key.endswith("lora_A.weight"):
            prefix = key.removesuffix("lora_A.weight")
            ranks[prefix] = a.shape[0] // num_experts if is_experts_prefix(prefix) else a.shape[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {_pattern_key(p, first): k for p, k in ranks.items() if k != r}
    cfg = dict(first)
    cfg.update(
        {
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }
    )
    return cfg, ranks


def _pattern_key(prefix: str, cfg: dict) -> str:
    """Rank-pattern key of a module (PEFT matches it against module or parameter names)."""
    path = prefix.removeprefix(PREFIX).rstrip(".")
    if is_experts_prefix(prefix):  # experts: the pattern names the 3D parameter
        base = path.split(".base_layer")[0]
        entries = [p.rpartition(".") for p in cfg.get("target_parameters") or []]
        params = [param for pre, _, param in entries if base == pre or base.endswith("." + pre)]
        ordered = [p for p in ("gate_up_proj", "down_proj") if p in params]
        depth = path.count(".base_layer")
        return f"{base}.{ordered[len(ordered) - 1 - depth]}" if ordered else base
    moved = [
        p for p in cfg.get("target_parameters") or [] if p == f"{path}.weight" or f"{path}.weight".endswith("." + p)
    ]
    return f"{path}.weight" if moved else path


__all__ = ["MergeResult", "combine_adapter_folders", "module_scalings", "skeleton"]
