"""MiniMax-M2 / M2.1 (``minimax_m2``): parser and builders.

Every layer is MoE (no shared expert, no dense layers). The router is DeepSeek-V3's without groups
or scaling (transformers 5.17 ``MiniMaxM2TopKRouter``): sigmoid scores, a selection-only
``e_score_correction_bias``, top-k, the k scores renormalised to sum 1, so the blocks are
:func:`~.deepseek.build_deepseek_moe`. transformers keeps the bias on the MoE block
(``mlp.e_score_correction_bias``); we keep it on the router, like every other biased router here,
and the key map carries it to and from the checkpoint's ``block_sparse_moe.e_score_correction_bias``.

Attention: GQA without biases, RMSNorm over the whole q and k projections (all heads at once,
before the heads are split: :class:`~.attention.Attention` with ``qk_norm="full"``), rotate-half
RoPE on the first ``partial_rotary_factor`` of each head.

Aux loss: transformers 5.17 returns Mixtral's load-balancing loss for this model when asked
(``output_router_logits``): softmax over the raw router logits and their top-k without the
correction bias, not the sigmoid-and-bias selection the model routes by. ``.aux_loss`` follows
transformers' definition (:class:`MiniMaxRouter`), so a run with ``optim.aux_loss_coef`` trains the
loss a transformers trainer would; the routed counts (bias balancing, metrics) stay the real ones.

``rotary_dim``: MiniMax's own configs give the rotary width as ``rotary_dim`` (64 of 128), which
transformers 5.17 does not read (it rotates ``partial_rotary_factor`` of the head, default all of
it). A config with ``rotary_dim`` and no ``partial_rotary_factor`` is read as MiniMax (and vLLM)
read it: ``rotary_dim / head_dim``; one with both must agree.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..errors import CheckpointError
from .build import MOE_BUILDERS
from .config import MoEArgs, ModelArgs
from .deepseek import DeepSeekRouter, build_deepseek_moe
from .families import config_value, parse_llama, register_family

DEFAULTS: dict[str, Any] = dict(
    rope_theta=5000000.0,
    rms_norm_eps=1e-6,
    head_dim=128,
    max_position_embeddings=196608,
    num_local_experts=256,
    num_experts_per_tok=8,
    router_aux_loss_coef=0.001,
)


class MiniMaxRouter(DeepSeekRouter):
    """DeepSeek-V3's sigmoid router whose load-balancing terms are transformers' for MiniMax-M2."""

    def balance_terms(self, logits: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ARG002 - the interface
        # transformers' load_balancing_loss_func on this model's router logits: softmax, bias-free top-k
        probs = torch.softmax(logits, dim=-1)
        return probs, torch.topk(probs, self.top_k, dim=-1).indices


def _partial_rotary(cfg: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """``cfg`` with ``partial_rotary_factor`` set from ``rotary_dim`` where only that is given."""
    given = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    rotary_dim = cfg.get("rotary_dim")
    if rotary_dim is None:
        return cfg
    if given is not None and int(head_dim * given) != rotary_dim:
        raise CheckpointError(
            f"config.json of a 'minimax_m2' model: rotary_dim={rotary_dim} disagrees with "
            f"partial_rotary_factor={given} of head_dim={head_dim} (expected rotary_dim={int(head_dim * given)})"
        )
    return {**cfg, "partial_rotary_factor": rotary_dim / head_dim}


def parse_minimax_m2(raw: dict[str, Any]) -> ModelArgs:
    """MiniMax-M2: every layer a 256-expert sigmoid-routed MoE, q/k norm over all heads, partial RoPE."""
    cfg = {**DEFAULTS, **raw}
    cfg = _partial_rotary(cfg, config_value(cfg, "head_dim"))
    args = parse_llama(cfg)
    args.qkv_bias = args.o_bias = False
    args.qk_norm = "full"
    args.moe = MoEArgs(
        num_experts=config_value(cfg, "num_local_experts", "num_experts"),
        top_k=config_value(cfg, "num_experts_per_tok"),
        intermediate_size=config_value(cfg, "intermediate_size"),
        norm_topk_prob=True,
        layers=[True] * args.num_layers,
        scoring="sigmoid",
        topk_method="noaux_tc",
        correction_bias=True,
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
    )
    args.intermediate_size = 0  # no dense FFN anywhere
    args.hf_config = dict(raw)
    return args


register_family("minimax_m2", parse_minimax_m2)
MOE_BUILDERS["minimax_m2"] = partial(build_deepseek_moe, router_cls=MiniMaxRouter)
