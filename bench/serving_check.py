"""Exported adapters read by the servers' own loading code, on CPU (issue 17; not in the test run).

vLLM pins its own torch, so it is not imported as a package: this script executes vLLM's source
files (``vllm/lora/peft_helper.py``, ``lora_weights.py``, ``lora_model.py`` whole; from
``lora/utils.py`` ``parse_fine_tuned_lora_name`` / ``is_base_embedding_weights`` / ``get_lora_id``;
``WeightsMapper`` from ``model_executor/models/utils.py``; ``RoutedExperts.build_expert_params_mapping``
and ``EplbState.build_initial_global_physical_to_logical_map``; each family's ``hf_to_vllm_mapper``,
MoE block name and ``ckpt_names`` read from its model file) with stub modules for logging and config
types. For each family and adapter case it exports moetune's per-expert folder, loads it with
``LoRAModel.from_local_checkpoint`` (the worker's arguments: expected modules from the packed
mapping, the model's rename mapper), packs each experts module as ``_create_merged_loras_inplace``
does with ``PackedLoRALayerWeights.pack_moe``, and compares the per-expert deltas vLLM assembles
(``scaling * B @ A``) with moetune's, and the logits of the base with vLLM's deltas merged in with
the trained model's.

With ``--sglang`` it does the same through SGLang 0.5.23's ``LoRAAdapter`` (``lora/lora.py``: its
``scaling = lora_alpha / r``, weight normalisation - w1/w3/w2 renamed, gate and up stacked per expert)
executed from its source, for the per-expert folder with and without ``fold_scaling``; the memory
pool's rule that every pair has the config's rank ``r`` is checked as a reproduction (an assertion).

    python bench/serving_check.py --vllm /path/containing/vllm   # site-packages or an unpacked wheel
    python bench/serving_check.py --sglang /path/containing/sglang
    python bench/serving_check.py --moe-peft /path/to/MoE-PEFT   # a checkout of github.com/TUDB-Labs/MoE-PEFT

With ``--moe-peft`` it also exports a MixLoRA adapter in MoE-PEFT's layout and runs MoE-PEFT's own
``LLMModel.load_adapter`` and forward on a tiny Llama (MoE-PEFT reads transformers-4 config names,
so ``rope_theta`` is set on the config for it), comparing its logits with moetune's.

Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import torch
import transformers

import moetune
import moetune.config
from moetune.config import LoraConfig
from moetune.model import build_random_model, model_args_from_hf
from moetune.peft.core.inject import add_adapter
from moetune.peft.lora.experts import LoraGroupedExperts
from moetune.peft.lora.linear import LoraLinear

FAMILIES = {  # family -> (vLLM model file, transformers config class, tiny config)
    "mixtral": ("mixtral", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "qwen2_moe",
        "Qwen2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    ),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmoe": ("olmoe", "OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "deepseek_v2",
        "DeepseekV3Config",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, n_group=2, topk_group=1,
        ),
    ),
}  # fmt: skip
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
NEWER = {  # family -> vLLM model file; tiny configs from tests/tiny_families.py and tests/tiny_hybrid.py
    "glm4_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe_lite",
    "minimax_m2": "minimax_m2",
    "qwen3_next": "qwen3_next",
}


def tiny_args(family: str):
    if family in FAMILIES:
        _, cfg_cls, extra = FAMILIES[family]
        return model_args_from_hf(getattr(transformers, cfg_cls)(**SMALL, vocab_size=128, **extra).to_dict())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_families
    import tiny_hybrid

    cfg_cls, _, kwargs = {**tiny_families.CASES, **tiny_hybrid.CASES}[family]
    return model_args_from_hf(getattr(transformers, cfg_cls)(**kwargs).to_dict())


def _experts_8_8(path: str, cfg: LoraConfig) -> LoraConfig:
    return dataclasses.replace(cfg, r=8, alpha=8) if path.endswith(("gate_up_proj", "down_proj")) else cfg


CASES = {  # the adapter: experts at r=8 alpha=8 under r=4 alpha=8 ("patterns"), rsLoRA, one projection only
    "all": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts"]), None),
    "patterns": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts"]), _experts_8_8),
    "rslora": (LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["o_proj", "experts"]), None),
    "rslora_patterns": (LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["o_proj", "experts"]), _experts_8_8),
    "down_only": (LoraConfig(r=4, alpha=8, target_modules=["o_proj", "experts.down_proj"]), None),
}


# --- vLLM's code, executed from its files ---------------------------------------------------
def _defs(path: Path, names: set[str], namespace: dict, *, inside: str | None = None) -> dict:
    """Execute the top-level definitions ``names`` of a source file (or of class ``inside``)."""
    tree = ast.parse(path.read_text())
    body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == inside) if inside else tree.body
    picked = []
    for node in body:
        name = getattr(node, "name", None) or (node.targets[0].id if isinstance(node, ast.Assign) else None)
        if name in names:
            if isinstance(node, ast.FunctionDef):
                node.decorator_list = []
            picked.append(node)
    exec(compile(ast.Module(body=picked, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def _stub(name: str, **attrs) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def load_vllm(root: Path) -> dict:
    """vLLM's LoRA loading functions, from the source under ``root`` (the folder holding ``vllm/``)."""
    src = root / "vllm"
    logger = logging.getLogger("vllm")
    logger.info_once = logger.warning_once = logger.info  # vllm.logger's extra methods
    for pkg in ("vllm", "vllm.lora", "vllm.config", "vllm.utils", "vllm.model_executor", "vllm.model_executor.models"):
        _stub(pkg, __path__=[])
    _stub("vllm.logger", init_logger=lambda _: logger)
    _stub("vllm.config.lora", LoRAConfig=object)
    _stub("vllm.utils.torch_utils", PIN_MEMORY=False)
    common = {"re": __import__("regex"), "logger": logger, "os": __import__("os")}
    utils = _defs(src / "lora/utils.py", {"_GLOBAL_LORA_ID", "get_lora_id", "parse_fine_tuned_lora_name",
                                          "is_base_embedding_weights"}, dict(common))  # fmt: skip
    _stub("vllm.lora.utils", **{k: v for k, v in utils.items() if not k.startswith("__")})
    models_utils = _stub("vllm.model_executor.models.utils", **common, torch=torch, Mapping=dict, Iterable=list)
    mapper_ns = models_utils.__dict__  # a dataclass's module must be importable
    mapper_ns |= {"dataclass": dataclasses.dataclass, "field": dataclasses.field, "replace": dataclasses.replace}
    mapper_ns |= {"ShardIds": object, "__name__": "vllm.model_executor.models.utils"}
    _defs(src / "model_executor/models/utils.py", {"WeightsMapper"}, mapper_ns)
    out = {"WeightsMapper": mapper_ns["WeightsMapper"]}
    for mod in ("peft_helper", "lora_weights", "lora_model"):
        spec = importlib.util.spec_from_file_location(f"vllm.lora.{mod}", src / f"lora/{mod}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        out[mod] = module
    eplb = _defs(src / "distributed/eplb/eplb_state.py", {"build_initial_global_physical_to_logical_map"},
                 {"Sequence": list}, inside="EplbState")  # fmt: skip
    eplb_cls = type("EplbState", (), {"build_initial_global_physical_to_logical_map": staticmethod(
        eplb["build_initial_global_physical_to_logical_map"])})  # fmt: skip
    routed = _defs(src / "model_executor/layers/fused_moe/routed_experts.py", {"build_expert_params_mapping"},
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


def vllm_read(vllm: dict, folder: Path, family: str, model) -> dict[str, torch.Tensor]:
    """Our parameter name -> the delta vLLM's loading code assembles from ``folder``."""
    block, (w1, w2, w3), mapper = vllm_family(vllm, FAMILIES[family][0] if family in FAMILIES else NEWER[family])
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


# --- moetune's side ---------------------------------------------------------------------------
def trained_model(family: str, case: str):
    model = build_random_model(tiny_args(family), std=0.08).eval()
    config, per_module = CASES[case]
    add_adapter(model, config, "default", per_module=per_module)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def our_deltas(model) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in ((p, m) for p, m in model.named_modules() if isinstance(m, LoraGroupedExperts)):
        base, F = layer.base_layer, layer.hidden
        d = {"gate_up_proj": torch.zeros_like(base.gate_up_proj), "down_proj": torch.zeros_like(base.down_proj)}
        rows = {"gate_up": slice(None), "gate": slice(0, F), "up": slice(F, 2 * F), "down": slice(None)}
        for pair in layer.pairs("default"):
            d["down_proj" if pair == "down" else "gate_up_proj"][:, rows[pair]] += layer.delta("default", pair)
        out |= {f"{path}.{k}": v for k, v in d.items()}
    return out


def check(vllm: dict, family: str, case: str, tmp: Path) -> dict:
    model = trained_model(family, case)
    folder = moetune.save_adapter(model, tmp / f"{family}-{case}", layout="per_expert")
    row = {"family": family, "case": case, "reader": "vllm (own code)"}
    row["bytes"] = (folder / "adapter_model.safetensors").stat().st_size
    try:
        got = vllm_read(vllm, folder, family, model)
    except (AssertionError, LookupError) as err:
        return row | {"error": f"{type(err).__name__}: {err}"}
    ours = our_deltas(model)
    row["max_delta_diff"] = max((got[k] - v).abs().max().item() for k, v in ours.items())
    fresh = build_random_model(model.args, std=0.08).eval()
    params = dict(fresh.named_parameters())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, d in got.items():
            params[name].add_(d)
        row["max_logit_diff"] = (fresh(ids).logits - model(ids).logits).abs().max().item()
    return row


# --- SGLang's own adapter code -------------------------------------------------------------------
def load_sglang(root: Path) -> types.ModuleType:
    """SGLang's ``lora/lora.py`` (``LoRAAdapter``: scaling, weight normalisation) and ``lora_config.py``,
    executed from the source under ``root`` with stubs for the loader, backend and config types."""
    src = root / "sglang/srt"
    for pkg in ("sglang", "sglang.srt", "sglang.srt.lora", "sglang.srt.layers", "sglang.srt.configs"):
        _stub(pkg, __path__=[])
    _stub("sglang.srt.configs.load_config", LoadConfig=object)
    _stub("sglang.srt.lora.backend.base_backend", BaseLoRABackend=object)
    _stub("sglang.srt.model_loader.loader", DefaultModelLoader=object)
    _stub("sglang.srt.utils.hf_transformers_utils", AutoConfig=object)
    _stub("sglang.srt.model_executor.forward_batch_info", ForwardBatch=object)
    layer_utils = _defs(src / "layers/utils/common.py", {"get_layer_id"}, {"re": re})
    _stub("sglang.srt.layers.utils", get_layer_id=layer_utils["get_layer_id"])
    modules = {}
    for mod in ("lora_config", "utils", "lora"):
        spec = importlib.util.spec_from_file_location(f"sglang.srt.lora.{mod}", src / f"lora/{mod}.py")
        modules[mod] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[mod]
        spec.loader.exec_module(modules[mod])
    return modules


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


def merged_logits_diff(model, deltas: dict[str, torch.Tensor]) -> float:
    fresh = build_random_model(model.args, std=0.08).eval()
    params = dict(fresh.named_parameters())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d)
        return (fresh(ids).logits - model(ids).logits).abs().max().item()


def sglang_check(sgl: dict, family: str, case: str, tmp: Path, *, fold: bool) -> dict:
    model = trained_model(family, case)
    folder = moetune.save_adapter(model, tmp / f"sg-{family}-{case}-{fold}", layout="per_expert", fold_scaling=fold)
    row = {"family": family, "case": case, "reader": "sglang (own code)", "fold_scaling": fold}
    row["bytes"] = (folder / "adapter_model.safetensors").stat().st_size
    try:
        got = sglang_read(sgl, folder, model)
    except AssertionError as err:
        return row | {"error": f"AssertionError: {err}"}
    ours = our_deltas(model)
    row["max_delta_diff"] = max((got[k] - v).abs().max().item() for k, v in ours.items())
    return row | {"max_logit_diff": merged_logits_diff(model, got)}


# --- MoE-PEFT's own loader and forward ------------------------------------------------------
def moe_peft_check(root: Path, tmp: Path, dropout: float) -> dict:
    """A MixLoRA adapter exported with ``layout="moe_peft"``, loaded by MoE-PEFT's ``LLMModel.load_adapter``
    (its ``torch.load`` of our ``adapter_model.bin``) on a tiny Llama, logits against moetune's."""
    sys.path.insert(0, str(root))
    sys.modules.setdefault("evaluate", types.ModuleType("evaluate"))  # MoE-PEFT's task metrics only
    from moe_peft.common import LLMBatchConfig, LLMModelInput
    from moe_peft.model import LLMModel, from_pretrained

    hf_cfg = transformers.LlamaConfig(**SMALL, vocab_size=128)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    hf.save_pretrained(tmp / "llama")
    ours = moetune.load_model(tmp / "llama", dtype=torch.float32).eval()
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    mixture = moetune.config.MixtureConfig(num_experts=3, top_k=2, expert_r=2, expert_alpha=4)
    moetune.add_adapter(ours, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets, mixture=mixture), "mix")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moetune.trainable_parameters(ours, "mix").values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    folder = moetune.save_adapter(ours, tmp / f"mp{dropout}", name="mix", layout="moe_peft")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    hf.config.rope_theta, hf.config.rope_scaling = hf.config.rope_parameters["rope_theta"], None  # transformers-4 names
    llm = LLMModel(from_pretrained(hf, attn_impl="eager", use_sliding_window=False, device="cpu"))
    llm.load_adapter(str(folder), "mix")
    batch = [LLMBatchConfig(adapter_name_="mix", batch_start_idx_=0, batch_end_idx_=2)]
    with torch.no_grad():
        got = llm(LLMModelInput(batch_configs_=batch, batch_tokens_=ids.tolist(), inference_mode_=True))[0].logits
        want = ours(ids, adapter_names=["mix", "mix"]).logits
    row = {"reader": "MoE-PEFT (own loader)", "trained_dropout": dropout, "files": sorted(os.listdir(folder))}
    return row | {"max_logit_diff": (got - want).abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm", type=Path, help="folder holding the vllm package source")
    p.add_argument("--sglang", type=Path, help="folder holding the sglang package source")
    p.add_argument("--moe-peft", type=Path, help="a MoE-PEFT checkout (the folder holding moe_peft/)")
    p.add_argument("--family", action="append", choices=[*FAMILIES, *NEWER], help="default: all")
    ns = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if ns.vllm:
            vllm = load_vllm(ns.vllm)
            for family in ns.family or [*FAMILIES, *NEWER]:
                for case in CASES:
                    print(json.dumps(check(vllm, family, case, Path(tmp))), flush=True)
        if ns.sglang:
            sgl = load_sglang(ns.sglang)
            for family in ns.family or [*FAMILIES, *NEWER]:
                for case in CASES:
                    for fold in (False, True):
                        print(json.dumps(sglang_check(sgl, family, case, Path(tmp), fold=fold)), flush=True)
        if ns.moe_peft:
            for dropout in (0.0, 0.05):
                print(json.dumps(moe_peft_check(ns.moe_peft, Path(tmp), dropout)), flush=True)


if __name__ == "__main__":
    main()
