"""Combining several adapters into one: :mod:`.combine` (the tensor methods: linear, TIES, DARE,
SVD, cat) and :mod:`.folders` (``moetune merge-adapters``: adapter folders in, one folder out).
Folding one adapter into the base weights is :mod:`moetune.peft.lora.fold`."""
