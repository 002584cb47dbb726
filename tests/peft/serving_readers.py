"""How vLLM 0.33 and SGLang 0.5.23 read a per-expert LoRA folder, as data and a short reproduction.

Each step cites the reader's file and function it reproduces (read line by line from the released
wheels; ``bench/serving_check.py`` runs vLLM's own functions instead, where vLLM is at hand):

- ``VLLM_EXPERTS``: where each family's routed experts live in vLLM and their checkpoint names, from
  ``vllm/model_executor/models/<family>.py`` (the FusedMoE ``prefix``; ``ckpt_names``, default
  ``("gate_proj", "down_proj", "up_proj")`` in ``layers/fused_moe/layer.py``). The LoRA module of
  expert e is ``<experts>.{e}.<name>``, in the order (w1, w2, w3) per expert
  (``RoutedExperts.build_expert_params_mapping`` -> ``lora/utils.process_packed_modules_mapping``).
- ``VLLM_RENAMES``: the substring renames of the model's ``hf_to_vllm_mapper`` that vLLM applies to
  LoRA names (``worker_manager._load_adapter`` -> ``get_rename_mapper``; Mixtral maps
  ``.gate_proj.`` -> ``.w1.``, ``.up_proj.`` -> ``.w3.``, ``.down_proj.`` -> ``.w2.``).
- :func:`vllm_deltas`: ``LoRAModel.from_lora_tensors`` (``parse_fine_tuned_lora_name``: the module
  name is the key without ``base_model.model.`` and ``.lora_A.weight``; rank and scaling from
  ``PEFTHelper.get_rank_and_scaling`` on the name before renaming: first ``rank_pattern`` /
  ``alpha_pattern`` key with ``re.match(rf"(.*\\.)?({key})$", name)``, scaling alpha/r or
  alpha/sqrt(r) with ``use_rslora``), then ``_create_merged_loras_inplace`` +
  ``PackedLoRALayerWeights.pack_moe`` (each expert needs w1, w2 and w3: ``assert w1_lora is not
  None`` ...; an experts module no tensor reaches is skipped silently).
- :func:`sglang_deltas`: ``LoRAAdapter.__init__`` (``scaling = lora_alpha / r`` for every module)
  and ``LoRAMemoryPool`` (every module copied at rank ``config.r``; a shape that differs asserts).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."
_DEFAULT = ("mlp", ("gate_proj", "down_proj", "up_proj"))
VLLM_EXPERTS: dict[str, tuple[str, tuple[str, str, str]]] = {  # family -> (MoE block, (w1, w2, w3) names)
    "mixtral": ("block_sparse_moe", ("w1", "w2", "w3")),  # mixtral.py: MixtralMoE, ckpt_names=("w1", "w2", "w3")
    "qwen2_moe": _DEFAULT,  # qwen2_moe.py: Qwen2MoeSparseMoeBlock at .mlp, experts at .mlp.experts
    "qwen3_moe": _DEFAULT,  # qwen3_moe.py: Qwen3MoeSparseMoeBlock at .mlp
    "olmoe": _DEFAULT,  # olmoe.py: OlmoeMoE at .mlp
    "deepseek_v2": _DEFAULT,  # deepseek_v2.py: DeepseekV2MoE at .mlp (DeepSeek-V3 uses this file too)
    "deepseek_v3": _DEFAULT,
    "minimax_m2": (
        "block_sparse_moe",
        ("w1", "w2", "w3"),
    ),  # minimax_m2.py: MiniMaxM2MoE, ckpt_names=("w1", "w2", "w3")
    "glm4_moe": _DEFAULT,  # glm4_moe.py: Glm4MoE at .mlp
    "glm4_moe_lite": _DEFAULT,  # glm4_moe_lite.py: Glm4MoeLite(Glm4MoE) at .mlp
    "qwen3_next": _DEFAULT,  # qwen3_next.py: Qwen3NextSparseMoeBlock at .mlp
    "qwen3_5_moe_text": _DEFAULT,  # qwen3_5.py: Qwen3NextSparseMoeBlock at .mlp
}
VLLM_RENAMES: dict[str, dict[str, str]] = {
    "mixtral": {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."},
}
OUR_PROJ = {0: "gate_proj", 1: "down_proj", 2: "up_proj"}  # w1, w2, w3


def _match(pattern: dict, name: str):
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def _rank_scaling(cfg: dict, name: str, *, patterns: bool = True) -> tuple[int, float]:
    rank = (_match(cfg.get("rank_pattern") or {}, name) if patterns else None) or cfg["r"]
    alpha = (_match(cfg.get("alpha_pattern") or {}, name) if patterns else None) or cfg["lora_alpha"]
    return rank, alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "adapter_config.json").read_text()), load_file(
        str(folder / "adapter_model.safetensors")
    )


def _pairs(tensors: dict[str, torch.Tensor], rename=lambda n: n) -> dict[str, dict]:
    """parse_fine_tuned_lora_name: module name (renamed) -> {"peft": name before renaming, "A", "B"}."""
    out: dict[str, dict] = {}
    for key, t in tensors.items():
        name, kind = key.removeprefix(PREFIX).rsplit(".", 2)[:2]
        out.setdefault(rename(name + "."), {"peft": name})[kind[-1]] = t
    return {k.removesuffix("."): v for k, v in out.items()}


def vllm_deltas(folder: Path, family: str, expert_paths: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Our param path -> the delta vLLM assembles: ``<experts>.gate_up_proj`` (E, 2F, D),
    ``<experts>.down_proj`` (E, D, F) for each (our experts path, E); linears ``<path>.weight``.

    Raises AssertionError where pack_moe asserts, KeyError where no tensor reaches an experts module.
    """
    cfg, tensors = _read(folder)
    renames = VLLM_RENAMES.get(family, {})

    def rename(name: str) -> str:
        for old, new in renames.items():
            name = name.replace(old, new, 1) if old in name else name
        return name

    loras = _pairs(tensors, rename)
    block, ckpt = VLLM_EXPERTS[family]
    out: dict[str, torch.Tensor] = {}
    for ours, num in expert_paths:
        theirs = re.sub(r"\.mlp\.experts$", f".{block}.experts", ours)
        names = [f"{theirs}.{e}.{ckpt[w]}" for e in range(num) for w in range(3)]
        found = [loras.pop(n, None) for n in names]
        if not any(found):
            raise KeyError(f"no LoRA tensor reaches vLLM's module {theirs}")
        assert all(f is not None for f in found), "pack_moe: assert w1/w2/w3_lora is not None"
        delta = {w: [] for w in range(3)}
        for i, lora in enumerate(found):
            _, s = _rank_scaling(cfg, lora["peft"])
            delta[i % 3].append(s * lora["B"] @ lora["A"])
        out[f"{ours}.gate_up_proj"] = torch.cat([torch.stack(delta[0]), torch.stack(delta[2])], dim=1)
        out[f"{ours}.down_proj"] = torch.stack(delta[1])
    for name, lora in loras.items():
        out[f"{name}.weight"] = _rank_scaling(cfg, lora["peft"])[1] * lora["B"] @ lora["A"]
    return out


def sglang_deltas(folder: Path, expert_paths: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """The deltas SGLang computes: ``lora_alpha / r`` for every module, each pair at rank r. SGLang
    finds a module by layer id and target name (``get_target_module_name``), after renaming
    ``.w1.`` / ``.w3.`` / ``.w2.`` to gate/up/down (``LoRAAdapter._rename_expert_w_to_proj``)."""
    cfg, tensors = _read(folder)
    s = cfg["lora_alpha"] / cfg["r"]
    renames = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj.", ".block_sparse_moe.": ".mlp."}
    deltas: dict[str, torch.Tensor] = {}
    for name, lora in _pairs(tensors).items():
        assert lora["A"].shape[0] == cfg["r"], f"mem_pool: buffer rank {cfg['r']} != {name} rank {lora['A'].shape[0]}"
        name += "."
        for old, new in renames.items():
            name = name.replace(old, new)
        deltas[name.removesuffix(".")] = s * lora["B"] @ lora["A"]
    out: dict[str, torch.Tensor] = {}
    for ours, num in expert_paths:
        gate, up, down = (
            [deltas.pop(f"{ours}.{e}.{p}") for e in range(num)] for p in ("gate_proj", "up_proj", "down_proj")
        )
        out[f"{ours}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        out[f"{ours}.down_proj"] = torch.stack(down)
    return out | {f"{name}.weight": d for name, d in deltas.items()}


def merge_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Add each delta to the base parameter of that name (a model without adapters)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d.to(params[name].dtype))
    return model
