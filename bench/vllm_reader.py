"""vLLM's LoRA loading, executed from its source files (``bench/serving_check.py --vllm``).

vLLM pins its own torch, so it is not imported as a package: ``vllm/lora/peft_helper.py``,
``lora_weights.py``, ``lora_model.py`` run whole; from ``lora/utils.py`` ``parse_fine_tuned_lora_name`` /
``is_base_embedding_weights`` / ``get_lora_id``; ``WeightsMapper`` from ``model_executor/models/utils.py``;
``RoutedExperts.build_expert_params_mapping`` and ``EplbState.build_initial_global_physical_to_logical_map``;
each family's ``hf_to_vllm_mapper``, MoE block name and ``ckpt_names`` read from its model file; stub
modules for logging and config types. An exported folder is loaded with
``LoRAModel.from_local_checkpoint`` (the worker's arguments: expected modules from the packed mapping,
the model's rename mapper) and each experts module packed as ``_create_merged_loras_inplace`` does
with ``PackedLoRALayerWeights.pack_moe``; the result is the per-expert deltas vLLM assembles
(``scaling * B @ A``).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
from pathlib import Path

import torch

from moetune.peft.lora.experts import LoraGroupedExperts
from moetune.peft.lora.linear import LoraLinear
from source_exec import exec_defs, exec_file, stub


def load_vllm(root: Path) -> dict:
    """vLLM's LoRA loading functions, from the source under ``root`` (the folder holding ``vllm/``)."""
    src = root / "vllm"
    logger = logging.getLogger("vllm")
    logger.info_once = logger.warning_once = logger.info  # vllm.logger's extra methods
    for pkg in ("vllm", "vllm.lora", "vllm.config", "vllm.utils", "vllm.model_executor", "vllm.model_executor.models"):
        stub(pkg, __path__=[])
    stub("vllm.logger", init_logger=lambda _: logger)
    stub("vllm.config.lora", LoRAConfig=object)
    stub("vllm.utils.torch_utils", PIN_MEMORY=False)
    common = {"re": __import__("regex"), "logger": logger, "os": __import__("os")}
    utils = exec_defs(src / "lora/utils.py", {"_GLOBAL_LORA_ID", "get_lora_id", "parse_fine_tuned_lora_name",
                                              "is_base_embedding_weights"}, dict(common))  # fmt: skip
    stub("vllm.lora.utils", **{k: v for k, v in utils.items() if not k.startswith("__")})
    models_utils = stub("vllm.model_executor.models.utils", **common, torch=torch, Mapping=dict, Iterable=list)
    mapper_ns = models_utils.__dict__  # a dataclass's module must be importable
    mapper_ns |= {"dataclass": dataclasses.dataclass, "field": dataclasses.field, "replace": dataclasses.replace}
    mapper_ns |= {"ShardIds": object, "__name__": "vllm.model_executor.models.utils"}
    exec_defs(src / "model_executor/models/utils.py", {"WeightsMapper"}, mapper_ns)
    out = {"WeightsMapper": mapper_ns["WeightsMapper"]}
    for mod in ("peft_helper", "lora_weights", "lora_model"):
        out[mod] = exec_file(f"vllm.lora.{mod}", src / f"lora/{mod}.py")
    eplb = exec_defs(src / "distributed/eplb/eplb_state.py", {"build_initial_global_physical_to_logical_map"},
                     {"Sequence": list}, inside="EplbState")  # fmt: skip
    eplb_cls = type("EplbState", (), {"build_initial_global_physical_to_logical_map": staticmethod(
        eplb["build_initial_global_physical_to_logical_map"])})  # fmt: skip
    routed = exec_defs(src / "model_executor/layers/fused_moe/routed_experts.py", {"build_expert_params_mapping"},
                       dict(common, EplbState=eplb_cls), inside="RoutedExperts")  # fmt: skip
    out["build_expert_params_mapping"] = routed["build_expert_params_mapping"]
    out["root"] = src
    return out


def vllm_family(vllm: dict, model_file: str) -> tuple[str, tuple, object]:
    """(MoE block attribute, ckpt_names (w1, w2, w3), rename mapper or None) from the model file."""
    path = vllm["root"] / "model_executor/models" / f"{model_file}.py"
    tree = ast.parse(path.read_text())
    default = ("gate_proj", "down_proj", "up_proj")  # layers/fused_moe/layer.py: FusedMoEFactory's ckpt_names
    moe_class, names, mapper = None, default, None
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            call = getattr(node, "value", None)
            target = node.targets[0] if isinstance(node, ast.Assign) else None
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "FusedMoEFactory":
                if getattr(target, "attr", None) == "experts":
                    moe_class = cls.name
                    kw = {k.arg: k.value for k in call.keywords}
                    names = ast.literal_eval(kw["ckpt_names"]) if "ckpt_names" in kw else default
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "WeightsMapper" and mapper is None:
                mapper = eval(
                    compile(ast.Expression(call), str(path), "eval"), {"WeightsMapper": vllm["WeightsMapper"]}
                )  # noqa: S307
    block = next(  # the decoder layer's attribute holding the MoE block (a subclass counts, e.g. Glm4MoeLite)
        n.targets[0].attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign)
        and isinstance(n.value, ast.Call)
        and getattr(n.targets[0], "attr", None) in ("mlp", "block_sparse_moe")
        and re.search(r"(?i)moe", getattr(n.value.func, "id", ""))
        and "MLP" not in getattr(n.value.func, "id", "")
    )
    if moe_class is None:  # the experts are built in a parent class's file (glm4_moe_lite -> glm4_moe)
        parent = next(
            b.id for c in tree.body if isinstance(c, ast.ClassDef) for b in c.bases if "MoE" in getattr(b, "id", "")
        )
        for other in path.parent.glob("*.py"):
            if f"class {parent}(" in other.read_text():
                return (block, *vllm_family(vllm, other.stem)[1:2], mapper.get_rename_mapper() if mapper else None)
    return block, names, (mapper.get_rename_mapper() if mapper is not None else None)


def vllm_read(vllm: dict, folder: Path, model_file: str, model) -> dict[str, torch.Tensor]:
    """Our parameter name -> the delta vLLM's loading code assembles from ``folder`` for the family
    of vLLM's ``model_executor/models/<model_file>.py``."""
    block, (w1, w2, w3), mapper = vllm_family(vllm, model_file)
    helper = vllm["peft_helper"].PEFTHelper.from_local_dir(str(folder), None)
    experts = [(p, m) for p, m in model.named_modules() if isinstance(m, LoraGroupedExperts)]
    mapping = vllm["build_expert_params_mapping"](w1, w2, w3, experts[0][1].num_experts, routed_experts_prefix="")
    packed = [weight_name.rstrip(".") for _, weight_name, _, _ in mapping]  # process_packed_modules_mapping
    linears = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear, LoraLinear))}
    expected = linears | set(packed) | {"experts"}  # worker_manager._load_adapter
    lora = vllm["lora_model"].LoRAModel.from_local_checkpoint(
        str(folder), expected, helper, lora_model_id=1, device="cpu", dtype=torch.float32, weights_mapper=mapper
    )
    out: dict[str, torch.Tensor] = {}
    for path, layer in experts:
        module = re.sub(r"\.mlp\.experts$", f".{block}.experts", path)
        names = [f"{module.rsplit('.', 1)[0]}.{r}" for r in packed]  # _register_packed_modules
        found = [lora.loras.pop(n, None) for n in names]
        if not any(found):
            raise LookupError(f"vLLM: no LoRA reaches {module} (skipped silently by _create_merged_loras_inplace)")
        pk = vllm["lora_weights"].PackedLoRALayerWeights.pack_moe(found, module)
        d = [s * torch.bmm(b, a) for a, b, s in zip(pk.lora_a, pk.lora_b, pk.scaling)]  # w1, w2, w3
        out[f"{path}.gate_up_proj"], out[f"{path}.down_proj"] = torch.cat([d[0], d[2]], dim=1), d[1]
    for name, w in lora.loras.items():
        out[f"{name}.weight"] = w.scaling * w.lora_b @ w.lora_a
    return out
