"""``config.json`` -> :class:`ModelArgs`, one small parser per supported ``model_type``.

Each family differs from Llama in a handful of switches (biases, q/k norms, expert layout), so the
parsers share one base and override only what differs. Both the transformers 5 spelling
(``rope_parameters``, ``num_local_experts``) and the older one (``rope_theta`` + ``rope_scaling``,
``num_experts``) are accepted, because real checkpoints on the Hub use both.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import CheckpointError
from .config import MLAArgs, MoEArgs, ModelArgs, RopeArgs

Parser = Callable[[dict[str, Any]], ModelArgs]


def config_value(cfg: dict[str, Any], *names: str, default: Any = KeyError) -> Any:
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    if default is KeyError:
        raise CheckpointError(
            f"config.json of a '{cfg.get('model_type')}' model has no '{names[0]}' (needed to build it)"
        )
    return default


def parse_rope(cfg: dict[str, Any]) -> RopeArgs:
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    params = {**legacy, **params}
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise CheckpointError(
            f"config.json: rope_type '{kind}' is not supported (supported: default, linear, llama3, yarn)"
        )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return RopeArgs(
        theta=float(theta),
        kind=kind,
        factor=params.get("factor"),
        low_freq_factor=params.get("low_freq_factor", 1.0),
        high_freq_factor=params.get("high_freq_factor", 4.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=params.get("beta_fast") or 32.0,
        beta_slow=params.get("beta_slow") or 1.0,
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=params.get("truncate", True),
        partial_rotary_factor=params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)),
        llama_4_scaling_beta=params.get("llama_4_scaling_beta"),
    )


def _sliding_windows(cfg: dict[str, Any], num_layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    if cfg.get("model_type") in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window"):
        window = None
    if window is None:
        return [None] * num_layers
    types = cfg.get("layer_types")
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    first = cfg.get("max_window_layers", 0) if cfg.get("model_type", "").startswith("qwen") else 0
    return [window if i >= first else None for i in range(num_layers)]


def parse_llama(cfg: dict[str, Any]) -> ModelArgs:
    hidden = config_value(cfg, "hidden_size")
    heads = config_value(cfg, "num_attention_heads")
    layers = config_value(cfg, "num_hidden_layers")
    return ModelArgs(
        family=cfg["model_type"],
        vocab_size=config_value(cfg, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config_value(cfg, "num_key_value_heads", default=heads),
        head_dim=config_value(cfg, "head_dim", default=hidden // heads),
        intermediate_size=config_value(cfg, "intermediate_size", default=0),
        rms_norm_eps=config_value(cfg, "rms_norm_eps", default=1e-6),
        hidden_act=config_value(cfg, "hidden_act", default="silu"),
        max_position_embeddings=config_value(cfg, "max_position_embeddings", default=4096),
        rope=parse_rope(cfg),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=_sliding_windows(cfg, layers),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mtp_layers=int(config_value(cfg, "num_nextn_predict_layers", "num_mtp_layers", default=0)),
        hf_config=dict(cfg),
    )


def parse_qwen2(cfg: dict[str, Any]) -> ModelArgs:
    args = parse_llama(cfg)
    args.qkv_bias, args.o_bias = True, False
    return args


def parse_qwen3(cfg: dict[str, Any]) -> ModelArgs:
    args = parse_llama(cfg)
    args.qk_norm = "head"
    return args


def _moe_layers(cfg: dict[str, Any], num_layers: int, num_experts: int) -> list[bool]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    return [num_experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(num_layers)]


def _routed(cfg: dict[str, Any], *, norm_default: bool, inter_key: str) -> MoEArgs:
    experts = config_value(cfg, "num_local_experts", "num_experts")
    return MoEArgs(
        num_experts=experts,
        top_k=config_value(cfg, "num_experts_per_tok"),
        intermediate_size=config_value(cfg, inter_key),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", norm_default)),
        layers=_moe_layers(cfg, config_value(cfg, "num_hidden_layers"), experts),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
    )


def parse_mixtral(cfg: dict[str, Any]) -> ModelArgs:
    args = parse_llama(cfg)
    # Mixtral always renormalises its top-k weights; its config has no switch for it.
    args.moe = _routed({**cfg, "norm_topk_prob": True}, norm_default=True, inter_key="intermediate_size")
    return args


def parse_qwen2_moe(cfg: dict[str, Any]) -> ModelArgs:
    args = parse_qwen2(cfg)
    args.moe = _routed(cfg, norm_default=False, inter_key="moe_intermediate_size")
    args.moe.shared_intermediate_size = cfg.get("shared_expert_intermediate_size", 0) or 0
    args.moe.shared_expert_gate = args.moe.shared_intermediate_size > 0
    return args


def parse_qwen3_moe(cfg: dict[str, Any]) -> ModelArgs:
    args = parse_qwen3(cfg)
    args.moe = _routed(cfg, norm_default=False, inter_key="moe_intermediate_size")
    return args


def parse_olmoe(cfg: dict[str, Any]) -> ModelArgs:
    args = parse_llama(cfg)
    args.qk_norm = "full"
    args.clip_qkv = cfg.get("clip_qkv")
    args.moe = _routed(cfg, norm_default=False, inter_key="intermediate_size")
    return args


FAMILIES: dict[str, Parser] = {
    "llama": parse_llama,
    "mistral": parse_llama,
    "qwen2": parse_qwen2,
    "qwen3": parse_qwen3,
    "mixtral": parse_mixtral,
    "qwen2_moe": parse_qwen2_moe,
    "qwen3_moe": parse_qwen3_moe,
    "olmoe": parse_olmoe,
}


def with_defaults(parser: Parser, defaults: dict[str, Any], rope: dict[str, Any] | None = None) -> Parser:
    """``parser`` reading a config with ``defaults`` (transformers' for that family) for the keys it
    leaves out, and ``rope`` as its rope parameters when it gives neither ``rope_parameters`` nor
    ``rope_scaling``. The model keeps the config as given: save_pretrained writes the user's config
    back, not our defaults."""

    def parse(raw: dict[str, Any]) -> ModelArgs:
        cfg = {**defaults, **raw}
        if rope is not None and not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
            cfg["rope_parameters"] = dict(rope)
        args = parser(cfg)
        args.hf_config = dict(raw)
        return args

    return parse


def register_family(
    model_type: str, parser: Parser, *, defaults: dict[str, Any] | None = None, rope: dict[str, Any] | None = None
) -> None:
    """Add a family parser (used by families defined in other modules, e.g. DeepSeek), with the
    family's defaults for keys a config leaves out (see :func:`with_defaults`)."""
    FAMILIES[model_type] = parser if defaults is None and rope is None else with_defaults(parser, defaults or {}, rope)


def model_args_from_hf(cfg: dict[str, Any], *, where: str = "config.json") -> ModelArgs:
    """Build :class:`ModelArgs` from a HF config dict; unknown families are a clear error."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise CheckpointError(f"{where}: model_type '{model_type}' is not supported (supported: {supported})")
    if cfg.get("hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise CheckpointError(
            f"{where}: hidden_act '{cfg['hidden_act']}' is not supported (silu, gelu, gelu_pytorch_tanh, relu)"
        )
    return FAMILIES[model_type](cfg)


__all__ = ["FAMILIES", "MLAArgs", "model_args_from_hf", "register_family"]
