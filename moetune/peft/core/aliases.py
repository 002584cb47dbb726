"""Megatron-style target names accepted in ``target_modules``, as one declarative table.

Large training stacks built on Megatron-Core (NeMo, Megatron-Bridge, MindSpeed, Pai-Megatron-Patch)
name the same projections differently from Hugging Face. A ``target_modules`` entry that is one
of these aliases stands for the Hugging Face names on its right:

=====================  ======================================================  ==============================
alias                  Hugging Face target names                               where the alias comes from
=====================  ======================================================  ==============================
linear_q_proj          q_proj                                                  Megatron-Core MLA (no q LoRA)
linear_q_down_proj     q_a_proj                                                Megatron-Core MLA
linear_q_up_proj       q_b_proj                                                Megatron-Core MLA
linear_qb              q_b_proj                                                MindSpeed / Pai-Megatron MLA
linear_kv_down_proj    kv_a_proj_with_mqa                                      Megatron-Core MLA
linear_kv_up_proj      kv_b_proj                                               Megatron-Core MLA
linear_kvb             kv_b_proj                                               MindSpeed / Pai-Megatron MLA
linear_proj            o_proj                                                  Megatron-Core attention
linear_fc1             gate_proj, up_proj, experts.gate_proj, experts.up_proj  Megatron-Core MLP, experts
linear_fc2             down_proj, experts.down_proj                            Megatron-Core MLP, experts
output_layer           lm_head                                                 Megatron-Core GPTModel
=====================  ======================================================  ==============================

Megatron's ``linear_fc1`` is the fused gate+up projection of *every* FFN: the dense MLP
(``mlp.linear_fc1``), the shared experts (``mlp.shared_experts.linear_fc1``) and the routed
experts (``mlp.experts.linear_fc1``; NeMo/Megatron-Bridge LoRA adapts those too). The alias keeps
that meaning, so ``[linear_proj, linear_fc1, linear_fc2]`` adapts what it adapts in Megatron.
Name the Hugging Face modules (``mlp.gate_proj``, ``shared_experts``, ``experts.up_proj`` ...) for
a narrower choice.

Rules (applied by :mod:`.targets`):

- an alias is a whole ``target_modules`` entry (``self_attention.linear_proj`` is not one);
- a module that really has the alias's name wins (ChatGLM's ``output_layer`` is its own module);
- the alias selects the union of what its names select in the model at hand; names that are
  absent are skipped (``linear_fc1`` on a dense model is just ``gate_proj`` + ``up_proj``), and an
  alias none of whose names exists is an error, like any target that matches nothing.

``linear_qkv`` is not an alias: in Megatron-Core it is a fused q/k/v (GQA) and in MindSpeed's MLA
the fused ``q_a_proj`` + ``kv_a_proj_with_mqa``; name the Hugging Face projections instead.
Adapter files never contain aliases: ``save_adapter`` writes the resolved Hugging Face names.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

__all__ = ["TARGET_ALIASES", "alias_targets"]

TARGET_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # multi-head latent attention (DeepSeek-V2/V3)
        "linear_q_proj": ("q_proj",),
        "linear_q_down_proj": ("q_a_proj",),
        "linear_q_up_proj": ("q_b_proj",),
        "linear_qb": ("q_b_proj",),
        "linear_kv_down_proj": ("kv_a_proj_with_mqa",),
        "linear_kv_up_proj": ("kv_b_proj",),
        "linear_kvb": ("kv_b_proj",),
        # attention output, feed-forward, LM head (all families)
        "linear_proj": ("o_proj",),
        "linear_fc1": ("gate_proj", "up_proj", "experts.gate_proj", "experts.up_proj"),
        "linear_fc2": ("down_proj", "experts.down_proj"),
        "output_layer": ("lm_head",),
    }
)


def alias_targets(entry: str) -> tuple[str, ...]:
    """The Hugging Face target names a ``target_modules`` entry stands for; ``()`` when it is not an alias."""
    return TARGET_ALIASES.get(entry, ())
