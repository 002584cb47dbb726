"""AdaLoRA: :mod:`.adapters` (SVD-form adapter objects held by the LoRA wrappers) and
:mod:`.allocator` (PEFT's rank allocation and orthogonality regulariser)."""
