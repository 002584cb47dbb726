"""Adapters (LoRA family, mixtures) on top of the native models; imports model/, never the reverse."""

from .lora import qlora as _qlora  # noqa: F401  (LoRA wrappers for 4-bit bases; must be registered before any injection)
