"""MoE-PEFT's MixLoRA adapter format (github.com/TUDB-Labs/MoE-PEFT) <-> moetune.

The layout, from MoE-PEFT's ``get_lora_layer_weight`` / ``MixLoraConfig.export``:
``adapter_config.json`` holds ``peft_type: MIXLORA``, ``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules`` (attention projections get a plain LoRA, FFN projections the experts),
``routing_strategy`` (``mixlora`` = top-k, ``mixlora-dynamic`` = top-p, ``mixlora-switch``),
``num_experts``, ``top_k`` or ``top_p``/``temperature``, optional ``expert_lora`` (the experts'
own r/alpha/dropout); weight keys are
``mixlora.layers.{l}.mlp.moe_gate.weight`` (E, D), per expert
``mixlora.layers.{l}.mlp.{proj}.experts.{i}.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r),
and ``mixlora.layers.{l}.self_attn.{proj}.lora_{A,B}.weight``.

Semantics checked against MoE-PEFT's code: the router is a bias-free fp32 Linear; ``mixlora``
renormalises the top-k softmax weights (as ours); ``mixlora-dynamic`` keeps the top-p
probabilities *without* renormalising (imported as ``top_p_renormalize: false``); its
``mixlora-switch`` routes an over-capacity token's *input* through and scales by the router
probability, which is not what moetune's ``switch`` does, so switch files are refused rather
than loaded with another meaning. MoE-PEFT never saves DoRA magnitudes, so DoRA files are refused.

What MoE-PEFT's loader needs (``LLMModel.load_adapter`` and the config classes' ``check``):
``task_type`` (written ``CAUSAL_LM``, read back; other task types carry a classification head moetune
does not hold and are refused); integer ``r`` and ``lora_alpha`` (a fractional alpha is refused on
export); ``lora_dropout`` a float > 0, which MoE-PEFT then applies at inference as well (its LoRA
modules are held in plain dicts, so ``LLMModel.eval()`` never reaches their ``nn.Dropout``): the
export always writes :data:`MIN_DROPOUT` (1e-9; one activation in 10^9 dropped), so MoE-PEFT's
outputs are the trained model's, and the trained dropout is not carried (it only matters to
continued training); and the weights in ``adapter_model.bin``, the only file it reads
(``torch.load`` with ``weights_only=False``). The export writes that pickle beside
``adapter_model.safetensors`` (the same tensors); moetune itself only ever reads the safetensors file.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...config import LoraConfig, MixtureConfig
from ...errors import AdapterError, ConfigError

PEFT_TYPE = "MIXLORA"
PREFIX = "base_model.model."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
# Keys MoE-PEFT reads only for training (or for variants we map); anything else is refused.
_KNOWN = {
    "peft_type",
    "bias",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "routing_strategy",
    "num_experts",
    "top_k",
    "top_p",
    "temperature",
    "expert_lora",
    "use_rslora",
    "use_dora",
    "lora_init",
    "act_fn",
    "router_aux_loss_coef",
    "router_init_range",
    "jitter_noise",
    "router_loss",
    "router_dyn_loss_coef",
    "entropy_index",
    "entropy_type",
    "entropy_eps",
    "name",
    "task_name",
    "task_type",
    "base_model_name_or_path",
}
TASK_TYPE = "CAUSAL_LM"  # what MoE-PEFT's trainer writes for causal-LM tasks (CasualTask.peft_task_type)
# MoE-PEFT's LoRA asserts lora_dropout > 0 (common/lora_linear.py: ``assert config.lora_dropout_ > 0.0``)
# and applies it at inference too (its LoRA modules sit in plain dicts, so ``eval()`` never reaches
# them): every export writes this dropout, whatever the adapter was trained with.
MIN_DROPOUT = 1e-9
_FFN_PATH = re.compile(r"^model\.layers\.(\d+)\.mlp$")
_ATTN_PATH = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$")
_GATE_KEY = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight$")
_EXPERT_KEY = re.compile(
    r"^mixlora\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.experts\.(\d+)\.lora_([AB])\.weight$"
)
_ATTN_KEY = re.compile(r"^mixlora\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.lora_([AB])\.weight$")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# --- export ---------------------------------------------------------------------------------
def export(model: nn.Module, config: LoraConfig, parts: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, dict]:
    """(tensors, adapter_config) of a MixLoRA adapter in MoE-PEFT's layout.

    Raises:
        AdapterError: for what that layout cannot hold (other kinds or routings, DoRA, per-layer
            expert counts, modules other than each layer's ``mlp`` and attention projections,
            targets that skip some layers).
    """
    _check_exportable(config)
    tensors: dict[str, torch.Tensor] = {}
    layers_of: dict[str, set[int]] = {}
    for path, part in parts.items():
        if m := _FFN_PATH.match(path):
            layer = int(m.group(1))
            tensors[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = part["router.weight"]
            for key, t in part.items():
                if key == "router.weight":
                    continue
                proj, ab = key.split(".")[0], key.split(".")[2][-1]  # "<proj>.experts.lora_<A|B>.weight"
                for i in range(t.shape[0]):
                    tensors[f"mixlora.layers.{layer}.mlp.{proj}.experts.{i}.lora_{ab}.weight"] = t[i]
                layers_of.setdefault(proj, set()).add(layer)
        elif m := _ATTN_PATH.match(path):
            layer, proj = int(m.group(1)), m.group(2)
            for ab in "AB":
                tensors[f"mixlora.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"] = part[f"lora_{ab}.weight"]
            layers_of.setdefault(proj, set()).add(layer)
        else:
            raise AdapterError(
                f"{path}: MoE-PEFT's MixLoRA layout holds only each layer's mlp mixture and attention "
                "q/k/v/o LoRA; this adapter also adapts this module"
            )
    _check_uniform(model, layers_of)
    return tensors, _export_config(config, sorted(layers_of, key=(ATTENTION + FFN).index))


def _check_exportable(config: LoraConfig) -> None:
    mix = config.mixture
    if mix.kind != "mixlora":
        raise AdapterError(f"MoE-PEFT's MixLoRA layout holds mixlora adapters, not {mix.kind}")
    if config.use_dora:
        raise AdapterError("MoE-PEFT's layout has no place for DoRA magnitudes (MoE-PEFT never saves them)")
    for what, alpha in (("alpha", config.alpha), ("expert_alpha", mix.expert_alpha)):
        if alpha is not None and not float(alpha).is_integer():
            raise AdapterError(
                f"{what} {alpha} is not a whole number; MoE-PEFT's config check accepts integer alphas only"
            )
    if isinstance(mix.num_experts, list) and len(set(mix.num_experts)) > 1:
        raise AdapterError(
            "MoE-PEFT's layout has one num_experts for all layers; this adapter has " + str(mix.num_experts)
        )
    if mix.routing not in ("top_k", "top_p") or (mix.routing == "top_p" and mix.top_p_renormalize):
        raise AdapterError(
            f"routing {mix.routing}{' with top_p_renormalize' if mix.routing == 'top_p' else ''} has no "
            "MoE-PEFT equivalent (it has top_k = mixlora, and top_p without renormalising = mixlora-dynamic)"
        )


def _check_uniform(model: nn.Module, layers_of: dict[str, set[int]]) -> None:
    """MoE-PEFT puts every target on every layer (a missing one would be created at random)."""
    count = getattr(getattr(model, "args", None), "num_layers", None)
    want = set(range(count)) if count else set.union(*layers_of.values())
    for proj, layers in layers_of.items():
        if layers != want:
            raise AdapterError(
                f"{proj} is adapted in layers {sorted(layers)} only; MoE-PEFT's layout adapts every layer"
            )


def _export_config(config: LoraConfig, targets: list[str]) -> dict:
    mix = config.mixture
    num = mix.num_experts[0] if isinstance(mix.num_experts, list) else mix.num_experts
    cfg = {
        "peft_type": PEFT_TYPE,
        "task_type": TASK_TYPE,
        "bias": "none",
        "r": config.r,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": MIN_DROPOUT,
        "target_modules": targets,
        "num_experts": num,
        "router_aux_loss_coef": mix.router_aux_loss_coef,
        "router_init_range": mix.router_init_std,
        "jitter_noise": mix.jitter_noise,
        "lora_init": "gaussian" if config.init == "gaussian" else "original",
    }
    if config.use_rslora:
        cfg["use_rslora"] = True
    if mix.routing == "top_k":
        cfg.update(routing_strategy="mixlora", top_k=mix.top_k)
    else:
        cfg.update(routing_strategy="mixlora-dynamic", top_p=mix.top_p, temperature=0.0)
    expert = {
        k: v
        for k, v in (("r", mix.expert_r), ("lora_alpha", mix.expert_alpha), ("lora_dropout", mix.expert_dropout))
        if v is not None
    }
    if expert:
        cfg["expert_lora"] = {k: _number(v) if k == "lora_alpha" else v for k, v in expert.items()}
        if "lora_dropout" in expert:
            cfg["expert_lora"]["lora_dropout"] = MIN_DROPOUT
    return cfg


# --- import ---------------------------------------------------------------------------------
def config_from_file(raw: dict, where: str, *, hidden_act: str | None) -> LoraConfig:
    """The :class:`LoraConfig` of a MoE-PEFT MixLoRA ``adapter_config.json``."""
    _check_importable(raw, where, hidden_act)
    strategy = raw["routing_strategy"]
    targets = raw.get("target_modules")
    targets = [k for k, v in targets.items() if v] if isinstance(targets, dict) else list(targets or [])
    expert = raw.get("expert_lora") or {}
    routing = (
        dict(routing="top_k", top_k=raw.get("top_k", 2))
        if strategy == "mixlora"
        else dict(routing="top_p", top_p=raw.get("top_p", 0.8), top_p_renormalize=False)
    )
    try:
        mixture = MixtureConfig(
            kind="mixlora",
            num_experts=raw.get("num_experts"),
            **routing,
            router_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)),
            router_init_std=float(raw.get("router_init_range", 0.02)),
            jitter_noise=float(raw.get("jitter_noise", 0.0)),
            expert_r=expert.get("r"),
            expert_alpha=expert.get("lora_alpha"),
            expert_dropout=expert.get("lora_dropout"),
        )
        return LoraConfig(
            r=raw.get("r"),
            alpha=float(raw.get("lora_alpha", 0)),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=targets,
            use_rslora=bool(raw.get("use_rslora", False)),
            init="gaussian" if raw.get("lora_init") == "gaussian" else "kaiming",
            mixture=mixture,
        )
    except ConfigError as err:
        raise AdapterError(f"{where}: {err}") from None


def _check_importable(raw: dict, where: str, hidden_act: str | None) -> None:
    """Refuse what moetune cannot load exactly: unknown keys, switch routing, DoRA, temperature, another act_fn."""
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise AdapterError(f"{where}: MoE-PEFT config keys {unknown} are not understood by moetune")
    if raw.get("task_type") not in (None, TASK_TYPE):
        raise AdapterError(
            f"{where}: task_type {raw['task_type']!r}: MoE-PEFT adds a classification head for it, which moetune "
            f"does not load (only {TASK_TYPE})"
        )
    strategy = raw.get("routing_strategy")
    if strategy not in ("mixlora", "mixlora-dynamic"):
        raise AdapterError(
            f"{where}: routing_strategy {strategy!r} is not supported (mixlora, mixlora-dynamic; "
            "MoE-PEFT's mixlora-switch computes something moetune's switch does not)"
        )
    if raw.get("use_dora"):
        raise AdapterError(
            f"{where}: use_dora is set, but MoE-PEFT never saves DoRA magnitudes, so the file cannot be loaded exactly"
        )
    if raw.get("temperature", 0.0):
        raise AdapterError(f"{where}: temperature {raw['temperature']} is not supported (only 0)")
    act = raw.get("act_fn")
    if act is not None and hidden_act is not None and act != hidden_act:
        raise AdapterError(
            f"{where}: act_fn {act!r} differs from the model's {hidden_act!r}; moetune's experts use the FFN's own"
        )


def import_tensors(tensors: dict[str, torch.Tensor], where: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """MoE-PEFT keys -> moetune's mixture keys (experts stacked into (E, ...) tensors)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        if m := _GATE_KEY.match(key):
            out[f"{PREFIX}model.layers.{m.group(1)}.mlp.router.weight"] = t
        elif m := _EXPERT_KEY.match(key):
            experts.setdefault((int(m.group(1)), m.group(2), m.group(4)), {})[int(m.group(3))] = t
        elif m := _ATTN_KEY.match(key):
            out[f"{PREFIX}model.layers.{m.group(1)}.self_attn.{m.group(2)}.lora_{m.group(3)}.weight"] = t
        else:
            raise AdapterError(
                f"{where}: tensor '{key}' is not a MoE-PEFT MixLoRA key (mixlora.layers.<l>.mlp.moe_gate.weight, "
                "...mlp.<proj>.experts.<i>.lora_A/B.weight, ...self_attn.<proj>.lora_A/B.weight)"
            )
    num = config.mixture.num_experts
    for (layer, proj, ab), per in experts.items():
        if sorted(per) != list(range(num)):
            raise AdapterError(
                f"{where}: mixlora.layers.{layer}.mlp.{proj}.experts.*.lora_{ab}.weight holds experts "
                f"{sorted(per)}, expected 0..{num - 1} (num_experts {num})"
            )
        out[f"{PREFIX}model.layers.{layer}.mlp.{proj}.experts.lora_{ab}.weight"] = torch.stack(
            [per[i] for i in range(num)]
        )
    return out
