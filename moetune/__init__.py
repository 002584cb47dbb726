"""moetune: LoRA-family fine-tuning of Mixture-of-Experts language models."""

from .config import LoraConfig
from .errors import MoetuneError
from .model import CausalLM, load_model
from .peft.core.inject import add_adapter, delete_adapter, set_adapter
from .peft.core.layer import disable_adapters
from .peft.core.params import trainable_parameters
from .peft.core.report import AdapterReport
from .peft.formats.adapters import load_adapter, save_adapter
from .peft.lora.fold import fold_adapter as merge_adapter

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
