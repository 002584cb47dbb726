"""Assemble a :class:`CausalLM` from :class:`ModelArgs` by injecting sub-modules.

Families that need other attention or routing (DeepSeek) register their own builders for the
attention and MoE parts; the decoder stack is shared.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .attention import Attention
from .config import ModelArgs
from .layers import RMSNorm, RotaryEmbedding, SwiGLU
from .moe import GroupedExperts, MoEBlock, TopKRouter
from .transformer import CausalLM, DecoderLayer, DecoderModel

PartBuilder = Callable[[ModelArgs, int], nn.Module]


def build_attention(
    args: ModelArgs,
    layer: int,
    *,
    kind: type[Attention] = Attention,
    norm: Callable[..., nn.Module] = RMSNorm,
    q_per_head: int = 1,
) -> nn.Module:
    """Grouped-query attention of class ``kind`` with its projections and q/k norms injected.

    Families whose attention differs only in what it does with them pass their own ``kind`` (gpt-oss's
    sinks), ``norm`` class for the q/k norms and ``q_per_head``, the vectors ``q_proj`` emits per head
    (Qwen3-Next: the query and an output gate).
    """
    D, H, K, Dh = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim
    q_norm = k_norm = None
    if args.qk_norm == "head":
        q_norm, k_norm = norm(Dh, eps=args.rms_norm_eps), norm(Dh, eps=args.rms_norm_eps)
    elif args.qk_norm == "full":
        q_norm, k_norm = norm(H * Dh, eps=args.rms_norm_eps), norm(K * Dh, eps=args.rms_norm_eps)
    return kind(
        layer_idx=layer,
        num_heads=H,
        num_kv_heads=K,
        head_dim=Dh,
        q_proj=nn.Linear(D, q_per_head * H * Dh, bias=args.qkv_bias),
        k_proj=nn.Linear(D, K * Dh, bias=args.qkv_bias),
        v_proj=nn.Linear(D, K * Dh, bias=args.qkv_bias),
        o_proj=nn.Linear(H * Dh, D, bias=args.o_bias),
        q_norm=q_norm,
        k_norm=k_norm,
        qk_norm=args.qk_norm,
        clip_qkv=args.clip_qkv,
    )


def build_moe(args: ModelArgs, layer: int) -> nn.Module:  # noqa: ARG001 - every part builder takes the layer index
    moe, D = args.moe, args.hidden_size
    shared = gate = None
    if moe.shared_intermediate_size:
        shared = SwiGLU(dim=D, hidden=moe.shared_intermediate_size, act=args.hidden_act)
    if moe.shared_expert_gate:
        gate = nn.Linear(D, 1, bias=False)
    return MoEBlock(
        gate=TopKRouter(dim=D, num_experts=moe.num_experts, top_k=moe.top_k, norm_topk_prob=moe.norm_topk_prob),
        experts=GroupedExperts(num_experts=moe.num_experts, dim=D, hidden=moe.intermediate_size, act=args.hidden_act),
        shared_expert=shared,
        shared_expert_gate=gate,
    )


def build_dense_mlp(args: ModelArgs, layer: int) -> nn.Module:  # noqa: ARG001 - the part builder signature
    return SwiGLU(dim=args.hidden_size, hidden=args.intermediate_size, act=args.hidden_act)


def build_rotary(args: ModelArgs) -> nn.Module:
    return RotaryEmbedding(rope=args.rope, head_dim=args.head_dim, max_position_embeddings=args.max_position_embeddings)


ATTENTION_BUILDERS: dict[str, PartBuilder] = {}
MOE_BUILDERS: dict[str, PartBuilder] = {}
DENSE_BUILDERS: dict[str, PartBuilder] = {}
ROTARY_BUILDERS: dict[str, Callable[[ModelArgs], nn.Module]] = {}
# family -> norm class (called as ``norm(dim, eps=...)``) of the decoder blocks and the final norm
NORM_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def build_causal_lm(args: ModelArgs) -> CausalLM:
    """Build the model with uninitialised weights (call under ``torch.device('meta')`` to skip allocation)."""
    attn = ATTENTION_BUILDERS.get(args.family, build_attention)
    moe = MOE_BUILDERS.get(args.family, build_moe)
    dense = DENSE_BUILDERS.get(args.family, build_dense_mlp)
    norm = NORM_BUILDERS.get(args.family, RMSNorm)
    layers = []
    for i in range(args.num_layers):
        is_moe = args.is_moe_layer(i)
        layers.append(
            DecoderLayer(
                self_attn=attn(args, i),
                mlp=moe(args, i) if is_moe else dense(args, i),
                input_layernorm=norm(args.hidden_size, eps=args.rms_norm_eps),
                post_attention_layernorm=norm(args.hidden_size, eps=args.rms_norm_eps),
                is_moe=is_moe,
                attn_name="linear_attn" if args.is_linear_attention_layer(i) else "self_attn",
            )
        )
    rotary = ROTARY_BUILDERS.get(args.family, build_rotary)(args)
    model = DecoderModel(
        args=args, layers=layers, rotary_emb=rotary, norm=norm(args.hidden_size, eps=args.rms_norm_eps)
    )
    lm = CausalLM(args=args, model=model, lm_head=nn.Linear(args.hidden_size, args.vocab_size, bias=False))
    lm.tie_weights()
    return lm
