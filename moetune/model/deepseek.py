"""DeepSeek-V2 / DeepSeek-V3: group-limited router, family parsers and builders.

Legend: N tokens (B*T flattened), D model dim, E routed experts, k experts per token,
G expert groups (``n_group``), E/G experts per group.

Routing (transformers 5.17 ``DeepseekV2TopkRouter`` / ``DeepseekV3TopkRouter``, in fp32):
  scores  = softmax(logits) (V2) or sigmoid(logits) (V3)
  choice  = scores + e_score_correction_bias (V3; the bias steers *selection* only)
  groups  = greedy: none; group_limited_greedy (V2): group score = max of its experts;
            noaux_tc (V3): group score = sum of its top-2 experts; keep the best ``topk_group``
  experts = top-k of ``choice`` inside the kept groups
  weights = scores at those experts [/ their sum (V3 norm_topk_prob)] * routed_scaling_factor
transformers' V2 router ignores ``norm_topk_prob`` (every released V2 checkpoint sets it false),
and so do we.

Everything else is shared with the other MoE families: the router returns a :class:`Routing`,
and :class:`MoEBlock` dispatches to :class:`GroupedExperts` (3D weights) and adds the shared
experts, registered as ``shared_experts`` like transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .build import ATTENTION_BUILDERS, DENSE_BUILDERS, MOE_BUILDERS
from .config import ModelArgs
from .deepseek_config import DEFAULTS, parse_deepseek_v2, parse_deepseek_v3, parse_kimi_k2
from .families import register_family
from .layers import RMSNorm, SwiGLU
from .mla import MultiHeadLatentAttention, mla_softmax_scale
from .moe import GroupedExperts, MoEBlock, Router, Routing

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class DeepSeekRouter(Router):
    """Softmax or sigmoid scoring, group-limited top-k, optional selection-only correction bias.

    ``Routing.probs`` feeds the shared load-balancing loss: the softmax scores for softmax
    routers; for sigmoid routers the scores normalised to sum 1 per token (the affinities of
    DeepSeek-V3's sequence-wise balance loss), since raw sigmoid scores are not a distribution.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        scoring: str = "softmax",
        topk_method: str = "greedy",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = False,
        routed_scaling_factor: float = 1.0,
        correction_bias: bool = False,
    ) -> None:
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring '{scoring}' is not one of ('softmax', 'sigmoid')")
        if topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method '{topk_method}' is not one of {TOPK_METHODS}")
        self.weight = nn.Parameter(torch.empty(num_experts, dim))  # (E, D)
        # A frozen Parameter rather than a buffer so the loader and saver, which move parameters,
        # carry it under transformers' name; it has no gradient path (used inside top-k only).
        bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias
            else None
        )
        self.register_parameter("e_score_correction_bias", bias)
        self.num_experts, self.top_k, self.scoring, self.topk_method = num_experts, top_k, scoring, topk_method
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor

    def _apply(self, fn, recurse: bool = True):
        # Keep the correction bias fp32 whatever the model is cast to (transformers keeps it fp32
        # too): balancing steps of ~1e-3 vanish in bf16 next to bias values ~1e-1.
        bias = self.e_score_correction_bias
        before = None if bias is None else bias.data
        super()._apply(fn, recurse)
        after = self.e_score_correction_bias
        if after is not None and after.dtype != before.dtype:
            after.data = before.to(after.device)
        return self

    def _group_mask(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) -> bool (N, E), True for experts in the ``topk_group`` best groups."""
        N, G = choice.shape[0], self.n_group
        grouped = choice.view(N, G, self.num_experts // G)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return keep.unsqueeze(-1).expand_as(grouped).reshape(N, self.num_experts)

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, D) -> Routing with weights (N, k) in x's dtype, experts (N, k), probs (N, E) fp32."""
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.softmax(logits, dim=-1) if self.scoring == "softmax" else torch.sigmoid(logits)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.topk_group < self.n_group:
            choice = choice.masked_fill(~self._group_mask(choice), float("-inf"))
        experts = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        probs, aux_experts = self.balance_terms(logits, scores)
        return Routing(weights=weights.to(x.dtype), experts=experts, probs=probs, aux_experts=aux_experts)

    def balance_terms(self, logits: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: ARG002 - the interface
        """The load-balancing loss's (N, E) probabilities from the (N, E) fp32 logits and scores, and
        its (N, k) counted choices where they are not the routed experts (None: they are)."""
        return (scores if self.scoring == "softmax" else scores / scores.sum(dim=-1, keepdim=True)), None

    @property
    def has_correction_bias(self) -> bool:
        return self.e_score_correction_bias is not None

    @torch.no_grad()
    def update_correction_bias(self, counts: torch.Tensor, speed: float) -> torch.Tensor:
        """One aux-loss-free balancing step: ``bias_e += speed * sign(mean_load - load_e)``.

        Args:
            counts: (E,) tokens routed to each expert since the last step (sum micro-batches, and
                all-reduce across data-parallel ranks first so every rank applies the same step).
            speed: step size (DeepSeek-V3 used 1e-3).

        Returns:
            The (E,) change applied: overloaded experts become less likely to be chosen.
        """
        bias = self.e_score_correction_bias
        if bias is None:
            raise ValueError("this router has no e_score_correction_bias (only sigmoid routers of DeepSeek-V3 use one)")
        load = counts.detach().to(device=bias.device, dtype=torch.float32)
        if load.shape != bias.shape:
            raise ValueError(f"counts has shape {tuple(load.shape)}, expected ({self.num_experts},)")
        delta = speed * torch.sign(load.mean() - load)
        bias.add_(delta)
        return delta


# --- builders -------------------------------------------------------------------------------

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


def build_mla(args: ModelArgs, layer: int) -> nn.Module:
    m, D, H = args.mla, args.hidden_size, args.num_heads
    qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank is None:
        query = dict(q_proj=nn.Linear(D, H * qk_head_dim, bias=False))
    else:
        query = dict(
            q_a_proj=nn.Linear(D, m.q_lora_rank, bias=args.qkv_bias),
            q_a_layernorm=RMSNorm(m.q_lora_rank, eps=LATENT_NORM_EPS),
            q_b_proj=nn.Linear(m.q_lora_rank, H * qk_head_dim, bias=False),
        )
    return MultiHeadLatentAttention(
        layer_idx=layer,
        num_heads=H,
        kv_lora_rank=m.kv_lora_rank,
        qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim,
        softmax_scale=mla_softmax_scale(args.rope, qk_head_dim, args.max_position_embeddings),
        rope_layout=m.rope_layout,
        kv_a_proj_with_mqa=nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=args.qkv_bias),
        kv_a_layernorm=RMSNorm(m.kv_lora_rank, eps=LATENT_NORM_EPS),
        kv_b_proj=nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False),
        o_proj=nn.Linear(H * m.v_head_dim, D, bias=args.o_bias),
        **query,
    )


# The MoEArgs fields a DeepSeekRouter is built from, under the same names.
ROUTER_OPTIONS = (
    "num_experts",
    "top_k",
    "scoring",
    "topk_method",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "correction_bias",
)


def build_deepseek_moe(
    args: ModelArgs,
    layer: int,  # noqa: ARG001 - the part builder signature
    *,
    router_cls: type[DeepSeekRouter] = DeepSeekRouter,
) -> nn.Module:
    moe, D = args.moe, args.hidden_size
    shared = None
    if moe.shared_intermediate_size:
        shared = SwiGLU(dim=D, hidden=moe.shared_intermediate_size, act=args.hidden_act, bias=args.mlp_bias)
    router = router_cls(dim=D, **{name: getattr(moe, name) for name in ROUTER_OPTIONS})
    experts = GroupedExperts(num_experts=moe.num_experts, dim=D, hidden=moe.intermediate_size, act=args.hidden_act)
    return MoEBlock(gate=router, experts=experts, shared_expert=shared, shared_name="shared_experts")


def build_deepseek_dense(args: ModelArgs, layer: int) -> nn.Module:  # noqa: ARG001 - the part builder signature
    return SwiGLU(dim=args.hidden_size, hidden=args.intermediate_size, act=args.hidden_act, bias=args.mlp_bias)


def _register() -> None:
    for family, parser in (("deepseek_v2", parse_deepseek_v2), ("deepseek_v3", parse_deepseek_v3)):
        register_family(family, parser, defaults=DEFAULTS[family])
        ATTENTION_BUILDERS[family] = build_mla
        MOE_BUILDERS[family] = build_deepseek_moe
        DENSE_BUILDERS[family] = build_deepseek_dense
    register_family("kimi_k2", parse_kimi_k2, defaults=DEFAULTS["deepseek_v3"])  # builds a family "deepseek_v3" model


_register()
