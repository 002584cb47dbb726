"""Mixtures of LoRA experts (MixLoRA and relatives).

- :mod:`.ffn`: MixLoRA / MixDoRA on a dense SwiGLU FFN; :mod:`.linear`: MoLA / LoRAMoE inside a linear;
- :mod:`.router`: routing (top-k, top-p, switch, dense) and its sums; :mod:`.common`: token selection,
  expert init, shared helpers;
- :mod:`.plan`: which wrapper each target of a mixture config gets; :mod:`.stats`: router losses and metrics.
"""
