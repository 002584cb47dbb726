"""Adapters (LoRA family, mixtures) on top of the native models; imports model/, never the reverse.

One room per feature:

- :mod:`.core`: the adapter-layer protocol, the wrapper registry, target matching, injection,
  the parameter listing and the add-adapter report;
- :mod:`.lora`: LoRA / DoRA / PiSSA on linears, split-LoRA on routed experts, QLoRA, and folding
  an adapter into the base weights;
- :mod:`.adalora`: AdaLoRA's SVD-form adapters and its rank allocator;
- :mod:`.mixtures`: mixtures of LoRA experts (MixLoRA FFNs, MoLA / LoRAMoE linears, routers,
  placement, router statistics);
- :mod:`.formats`: the adapter folder and one module per file format;
- :mod:`.arithmetic`: combining several adapters into one (linear, TIES, DARE, SVD, cat).
"""
