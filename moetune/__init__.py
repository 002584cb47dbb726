"""moetune: LoRA-family fine-tuning of Mixture-of-Experts language models."""

from .errors import MoetuneError
from .model import CausalLM, load_model

__version__ = "0.1.0"

__all__ = ["CausalLM", "MoetuneError", "load_model"]
