"""SGLang 0.5.23's LoRA adapter code, executed from its source (``bench/serving_check.py --sglang``).

``lora/lora.py`` (``LoRAAdapter``: its ``scaling = lora_alpha / r``, weight normalisation - w1/w3/w2
renamed, gate and up stacked per expert) and ``lora_config.py`` run from the source with stub modules
for the loader, backend and config types. The memory pool's rule that every pair has the config's rank
``r`` is checked as a reproduction (an assertion).
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch

from moetune.peft.lora.experts import LoraGroupedExperts
from source_exec import exec_defs, exec_file, stub


def load_sglang(root: Path) -> dict[str, types.ModuleType]:
    """SGLang's ``lora/lora.py`` (``LoRAAdapter``: scaling, weight normalisation) and ``lora_config.py``,
    executed from the source under ``root`` with stubs for the loader, backend and config types."""
    src = root / "sglang/srt"
    for pkg in ("sglang", "sglang.srt", "sglang.srt.lora", "sglang.srt.layers", "sglang.srt.configs"):
        stub(pkg, __path__=[])
    stub("sglang.srt.configs.load_config", LoadConfig=object)
    stub("sglang.srt.lora.backend.base_backend", BaseLoRABackend=object)
    stub("sglang.srt.model_loader.loader", DefaultModelLoader=object)
    stub("sglang.srt.utils.hf_transformers_utils", AutoConfig=object)
    stub("sglang.srt.model_executor.forward_batch_info", ForwardBatch=object)
    layer_utils = exec_defs(src / "layers/utils/common.py", {"get_layer_id"}, {"re": re})
    stub("sglang.srt.layers.utils", get_layer_id=layer_utils["get_layer_id"])
    return {
        mod: exec_file(f"sglang.srt.lora.{mod}", src / f"lora/{mod}.py") for mod in ("lora_config", "utils", "lora")
    }


def sglang_read(sgl: dict, folder: Path, model) -> dict[str, torch.Tensor]:
    """Our parameter name -> the delta SGLang's ``LoRAAdapter`` holds for ``folder``: its normalised
    weights (gate/up stacked per expert, w1/w3/w2 renamed) times its ``scaling``; each pair's rank must
    be the config's ``r`` (``LoRAMemoryPool`` copies ``[:r]`` rows and asserts the shapes)."""
    from safetensors.torch import load_file

    config = sgl["lora_config"].LoRAConfig(str(folder))
    hf = types.SimpleNamespace(num_hidden_layers=model.args.num_layers)
    adapter = sgl["lora"].LoRAAdapter("a", config, hf, None, None)
    adapter.initialize_weights_from_tensors(load_file(str(folder / "adapter_model.safetensors")))
    out: dict[str, torch.Tensor] = {}
    experts = {p: m for p, m in model.named_modules() if isinstance(m, LoraGroupedExperts)}
    for layer in adapter.layers:
        for name, a in ((k, t) for k, t in layer.weights.items() if "lora_A" in k):
            b = layer.weights[name.replace("lora_A", "lora_B")]
            c = 2 if ".gate_up_proj." in name else 1
            assert a.shape[0] == c * config.r, f"mem_pool: {name} has rank {a.shape[0] // c}, buffers rank {config.r}"
            blocks = [
                b[i * b.shape[0] // c : (i + 1) * b.shape[0] // c] @ a[i * config.r : (i + 1) * config.r]
                for i in range(c)
            ]
            path = name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0].replace(".block_sparse_moe.", ".mlp.")
            out[path] = adapter.scaling * torch.cat(blocks)
    result: dict[str, torch.Tensor] = {}
    for path, layer in experts.items():
        E = layer.num_experts
        result[f"{path}.gate_up_proj"] = torch.stack([out.pop(f"{path}.{e}.gate_up_proj") for e in range(E)])
        result[f"{path}.down_proj"] = torch.stack([out.pop(f"{path}.{e}.down_proj") for e in range(E)])
    return result | {f"{k}.weight": v for k, v in out.items()}
