"""``config.json`` -> :class:`ModelArgs` for ``deepseek_v2`` and ``deepseek_v3``.

Keys a config leaves out take transformers 5.17's defaults for that family (they differ between
V2 and V3, e.g. ``routed_scaling_factor`` 1.0 vs 2.5), so a Hub config reads the same here as in
transformers. An explicit ``null`` stays null (``q_lora_rank: null`` is V2-Lite's direct
``q_proj``; ``n_group: null`` means one group).

Behaviour kept from transformers, not from DeepSeek's original remote code, where they differ:
V2 never renormalises its top-k weights (``norm_topk_prob`` is ignored) and V3 always routes with
``noaux_tc`` (``topk_method`` is ignored). Kept from the original code: ``moe_layer_freq`` (MoE in
layers ``i >= first_k_dense_replace`` with ``i % moe_layer_freq == 0``; transformers ignores it and
every released checkpoint sets 1, where both agree).
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .config import MLAArgs, MoEArgs, ModelArgs
from .families import config_value, parse_llama

# transformers 5.17's defaults of each family, for the keys a config.json leaves out
DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "q_lora_rank": 1536,
        "first_k_dense_replace": 0,
        "n_shared_experts": 2,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "n_group": None,
        "topk_group": None,
        "norm_topk_prob": False,
    },
    "deepseek_v3": {
        "q_lora_rank": 1536,
        "first_k_dense_replace": 3,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "rope_interleave": True,
    },
}


def _bad(cfg: dict[str, Any], field: str, allowed: str) -> CheckpointError:
    return CheckpointError(
        f"config.json of a '{cfg['model_type']}' model: {field}={cfg.get(field)!r} is not supported ({allowed})"
    )


def mla_args(cfg: dict[str, Any], rope_layout: str) -> MLAArgs:
    return MLAArgs(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=config_value(cfg, "kv_lora_rank"),
        qk_nope_head_dim=config_value(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=config_value(cfg, "qk_rope_head_dim"),
        v_head_dim=config_value(cfg, "v_head_dim"),
        rope_layout=rope_layout,
    )


def _moe_layers(cfg: dict[str, Any], num_layers: int) -> list[bool]:
    first = cfg.get("first_k_dense_replace") or 0
    freq = cfg.get("moe_layer_freq") or 1
    return [i >= first and i % freq == 0 for i in range(num_layers)]


def _check_groups(cfg: dict[str, Any], moe: MoEArgs) -> None:
    """Reject group settings transformers would crash on or silently route differently with."""
    E, G = moe.num_experts, moe.n_group
    if G < 1 or E % G:
        raise _bad(cfg, "n_group", f"a divisor of n_routed_experts={E}")
    if moe.topk_method == "greedy":
        return
    if not 1 <= moe.topk_group <= G:
        raise _bad(cfg, "topk_group", f"1..n_group={G}")
    if moe.top_k > moe.topk_group * (E // G):
        raise _bad(cfg, "num_experts_per_tok", f"at most topk_group * experts per group = {moe.topk_group * (E // G)}")
    if moe.topk_method == "noaux_tc" and E // G < 2:
        raise _bad(cfg, "n_group", f"at most n_routed_experts/2 = {E // 2}: V3 scores a group by its best two experts")


def deepseek_moe_args(
    cfg: dict[str, Any], num_layers: int, *, scoring: str, topk_method: str, norm_topk_prob: bool
) -> MoEArgs | None:
    experts = config_value(cfg, "n_routed_experts", "num_local_experts", "num_experts", default=0)
    if not experts:
        return None
    inter = config_value(cfg, "moe_intermediate_size")
    moe = MoEArgs(
        num_experts=experts,
        top_k=config_value(cfg, "num_experts_per_tok"),
        intermediate_size=inter,
        norm_topk_prob=norm_topk_prob,
        layers=_moe_layers(cfg, num_layers),
        shared_intermediate_size=inter * (cfg.get("n_shared_experts") or 0),
        scoring=scoring,
        topk_method=topk_method,
        n_group=cfg.get("n_group") or 1,
        topk_group=cfg.get("topk_group") or 1,
        routed_scaling_factor=float(config_value(cfg, "routed_scaling_factor", default=1.0)),
        correction_bias=scoring == "sigmoid",
        router_aux_loss_coef=float(cfg.get("aux_loss_alpha") or 0.0),
    )
    _check_groups(cfg, moe)
    return moe


def mla_model_args(cfg: dict[str, Any], rope_layout: str) -> ModelArgs:
    args = parse_llama(cfg)
    # kv_b_proj always emits one key/value per query head; num_key_value_heads plays no part.
    args.num_kv_heads = args.num_heads
    args.mla = mla_args(cfg, rope_layout)
    # The rotary tables cover only the rope dims (transformers sets head_dim the same way).
    args.head_dim = args.mla.qk_rope_head_dim
    args.rope.partial_rotary_factor = 1.0
    args.mlp_bias = bool(cfg.get("mlp_bias", False))
    return args


def v3_moe_args(cfg: dict[str, Any], num_layers: int, *, scoring: str = "sigmoid") -> MoEArgs | None:
    """DeepSeek-V3's routing (``noaux_tc`` groups, ``norm_topk_prob`` as configured) scored by ``scoring``."""
    return deepseek_moe_args(
        cfg, num_layers, scoring=scoring, topk_method="noaux_tc", norm_topk_prob=bool(cfg.get("norm_topk_prob"))
    )


def v3_rope_layout(cfg: dict[str, Any]) -> str:
    """The rope layout of DeepSeek-V3 and its descendants: interleaved pairs unless ``rope_interleave`` is false."""
    return "interleave" if cfg.get("rope_interleave", True) else "half"


def parse_deepseek_v2(cfg: dict[str, Any]) -> ModelArgs:
    """DeepSeek-V2 / V2-Lite / V2.5: softmax router, greedy or group-limited greedy top-k."""
    method = cfg.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise _bad(cfg, "topk_method", "greedy or group_limited_greedy")
    args = mla_model_args(cfg, rope_layout="complex")
    args.moe = deepseek_moe_args(cfg, args.num_layers, scoring="softmax", topk_method=method, norm_topk_prob=False)
    return args


def parse_deepseek_v3(cfg: dict[str, Any]) -> ModelArgs:
    """DeepSeek-V3 / R1 and others with model_type deepseek_v3: sigmoid router with a correction bias."""
    args = mla_model_args(cfg, rope_layout=v3_rope_layout(cfg))
    args.moe = v3_moe_args(cfg, args.num_layers)
    return args


def parse_kimi_k2(cfg: dict[str, Any]) -> ModelArgs:
    """Kimi-K2 / K2-Thinking (model_type ``kimi_k2``): DeepSeek-V3's architecture under another name.
    transformers 5.17 has no ``kimi_k2`` model and reads one as ``deepseek_v3`` (Kimi-K2.5's text
    config does the same), so it is built and saved as DeepSeek-V3 would be (with V3's defaults);
    its own config.json is written back unchanged."""
    return parse_deepseek_v3({**cfg, "model_type": "deepseek_v3"})
