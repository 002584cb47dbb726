"""Adapters (LoRA family, mixtures) on top of the native models; imports model/, never the reverse."""
