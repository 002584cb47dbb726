"""Pure nn.Modules for the supported model families; never imports peft/ or train/."""

from . import deepseek as _deepseek  # noqa: F401 - registers the deepseek_v2 / deepseek_v3 families
from . import glm as _glm  # noqa: F401 - registers the glm4_moe / glm4_moe_lite families
from . import gpt_oss as _gpt_oss  # noqa: F401 - registers the gpt_oss family
from . import minimax as _minimax  # noqa: F401 - registers the minimax_m2 family
from . import mistral4 as _mistral4  # noqa: F401 - registers the mistral4 family
from . import qwen3_next as _qwen3_next  # noqa: F401 - registers qwen3_next / qwen3_5_moe_text
from .attention import KVCache
from .config import MLAArgs, MoEArgs, ModelArgs, RopeArgs
from .families import FAMILIES, model_args_from_hf, register_family
from .loading import build_random_model, load_model, read_hf_config
from .transformer import CausalLM, CausalLMOutput

__all__ = [
    "CausalLM",
    "CausalLMOutput",
    "FAMILIES",
    "KVCache",
    "MLAArgs",
    "MoEArgs",
    "ModelArgs",
    "RopeArgs",
    "build_random_model",
    "load_model",
    "model_args_from_hf",
    "read_hf_config",
    "register_family",
]
