"""LoRA and its linear-algebra variants.

- :mod:`.linear`: :class:`~.linear.LoraLinear`, the wrapper of an ``nn.Linear``;
  :mod:`.linear_adapters`: the adapter objects it holds (LoRA with PiSSA init, DoRA);
- :mod:`.experts`: :class:`~.experts.LoraGroupedExperts`, split-LoRA on routed experts;
  :mod:`.expert_adapters`: its adapter objects; :mod:`.experts_layout`: their file layouts;
- :mod:`.qlora`: the wrappers of 4-bit bases (no merge, no PiSSA);
- :mod:`.fold`: folding an adapter into the base weights (``moetune.merge_adapter``).
"""
