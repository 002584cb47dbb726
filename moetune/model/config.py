"""Architecture description of a decoder model, read from a Hugging Face ``config.json``.

``ModelArgs`` is the only thing the model code looks at; ``families.py`` turns each supported
``model_type`` into one. Keeping the HF dict around (``hf_config``) lets ``save_pretrained`` write
back the user's own config unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RopeArgs:
    """Rotary embedding settings (HF ``rope_parameters`` / legacy ``rope_scaling``)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | yarn
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0
    llama_4_scaling_beta: float | None = None  # Mistral 4's query temperature over positions


@dataclass
class MoEArgs:
    """Routed-expert settings; ``None`` on ``ModelArgs.moe`` for dense models."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    layers: list[bool]  # per decoder layer: True where the FFN is a MoE block
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared expert
    scoring: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    topk_method: str = "greedy"  # greedy | group_limited_greedy (DeepSeek-V2) | noaux_tc (DeepSeek-V3)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (selection only)
    router_aux_loss_coef: float = 0.0


@dataclass
class MLAArgs:
    """DeepSeek multi-head latent attention dimensions."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_layout: str = "interleave"  # complex (V2) | interleave | half (V3 rope_interleave false)


@dataclass
class LinearAttentionArgs:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5) dimensions; ``None`` on ``ModelArgs.linear`` elsewhere."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    layers: list[bool]  # per decoder layer: True where the token mixer is gated DeltaNet
    projections: str = "fused"  # fused: in_proj_qkvz + in_proj_ba (Qwen3-Next) | split: in_proj_qkv/z/b/a (Qwen3.5)


@dataclass
class ModelArgs:
    """Everything the model code needs to build a decoder-only causal LM."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope: RopeArgs = field(default_factory=RopeArgs)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # dense and shared-expert FFN biases (DeepSeek-V2 mlp_bias)
    qk_norm: str | None = None  # None | "head" (Qwen3) | "full" (OLMoE)
    clip_qkv: float | None = None
    sliding_window: list[int | None] = field(default_factory=list)  # per layer
    tie_word_embeddings: bool = False
    moe: MoEArgs | None = None
    mla: MLAArgs | None = None
    # Multi-token-prediction modules stored after the decoder layers (``num_nextn_predict_layers``):
    # checkpoint layers num_layers .. num_layers + mtp_layers - 1, skipped at load.
    mtp_layers: int = 0
    linear: LinearAttentionArgs | None = None
    wrapper: str | None = None  # model_type of the multimodal wrapper the text model came from (wrappers.py)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.layers[layer]

    def is_linear_attention_layer(self, layer: int) -> bool:
        return self.linear is not None and self.linear.layers[layer]
