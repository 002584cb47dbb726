"""moetune: LoRA-family fine-tuning of Mixture-of-Experts language models."""

from .config import LoraConfig
from .errors import MoetuneError
from .model import CausalLM, load_model
from .peft.core.inject import AdapterReport, add_adapter, delete_adapter, disable_adapters, set_adapter, trainable_parameters
from .peft.formats.io import load_adapter, merge_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterReport",
    "CausalLM",
    "LoraConfig",
    "MoetuneError",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "load_model",
    "merge_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
]
