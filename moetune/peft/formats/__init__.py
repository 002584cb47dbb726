"""Adapter files: :mod:`.folder` (the neutral folder layer) and one module per format.

- :mod:`.adapters`: ``save_adapter`` / ``load_adapter``, choosing the format;
- :mod:`.peft` (+ :mod:`.peft_config`, :mod:`.peft_meta`): PEFT's LoRA format; :mod:`.per_expert`:
  routed experts as per-expert 2D pairs (vLLM, SGLang); :mod:`.adalora`: PEFT's AdaLoRA layout;
- :mod:`.mixtures`: moetune's mixture layout; :mod:`.moe_peft`: MoE-PEFT's MixLoRA layout.
"""
