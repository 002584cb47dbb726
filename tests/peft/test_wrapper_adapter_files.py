"""Adapter files of text models loaded from multimodal wrappers (Kimi-K2.5, Qwen3.5-MoE) in every
format that names module paths: the wrapper's paths (``model.language_model.layers...``) are
written and read back - moetune's mixture layout, PEFT's AdaLoRA layout (loaded by ``peft`` on
transformers' wrapper), ``moetune merge-adapters`` - and MoE-PEFT's layout, which names no module
path and holds no routed-expert model, refuses clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetune
from moetune.config import AdaLoraOptions, MixtureConfig
from moetune.errors import AdapterError
from moetune.peft.adalora.adapters import svd_layers
from moetune.peft.arithmetic.folders import combine_adapter_folders
from moetune.peft.formats.adalora import save_adalora
from tiny_families import make_hf

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WRAPPED = "base_model.model.model.language_model.layers."
MLA = ["q_a_proj", "kv_b_proj"]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """Folder of a tiny Kimi-K2.5 saved by transformers (``make_hf`` rebuilds the same weights)."""
    folder = tmp_path_factory.mktemp("kimi_k25")
    hf = make_hf("kimi_k25")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    from tiny_hybrid import make_hf_wrapper

    folder = tmp_path_factory.mktemp("qwen3_5_moe")
    make_hf_wrapper().save_pretrained(folder)
    return folder


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits


def _with_adapter(folder, config, seed=1, name="default"):
    model = moetune.load_model(folder)
    moetune.add_adapter(model, config, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moetune.trainable_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _keys(folder):
    return list(load_file(str(folder / WEIGHTS)))


@pytest.mark.parametrize("wrapper", ["kimi_k25", "qwen3_5_moe"])
def test_mixture_layout_names_the_wrapper_paths_both_ways(wrapper, kimi, qwen3_5, tmp_path):
    """MixLoRA on the dense FFNs (Kimi's first layer, the shared experts) with attention LoRA: the
    file names the wrapper's paths and loads back to the same logits; a file with the text model's
    own paths (as moetune wrote before) still loads."""
    folder = kimi[0] if wrapper == "kimi_k25" else qwen3_5
    attention = MLA if wrapper == "kimi_k25" else ["q_proj", "in_proj_qkv"]
    config = moetune.LoraConfig(
        r=4, target_modules=[*attention, "gate_proj", "up_proj", "down_proj"], mixture=MixtureConfig(num_experts=3)
    )
    model = _with_adapter(folder, config)
    out = moetune.save_adapter(model, tmp_path / "mix")
    keys = _keys(out)
    assert keys and all(k.startswith(WRAPPED) for k in keys), keys[:3]
    native = {k.replace("model.language_model.", "model.", 1): t for k, t in load_file(str(out / WEIGHTS)).items()}
    shutil.copytree(out, tmp_path / "native")
    save_file(native, str(tmp_path / "native" / WEIGHTS))
    again = moetune.load_model(folder)
    moetune.load_adapter(again, out, name="wrapped")
    moetune.load_adapter(again, tmp_path / "native", name="native")
    want = _logits(model)
    with torch.no_grad():
        err = [(again(_ids(), adapter_names=[n, n]).logits - want).abs().max().item() for n in ("wrapped", "native")]
    print(
        f"{wrapper}: mixture layout round trip max|dlogits| {err[0]:.2e} (text model's paths {err[1]:.2e}), "
        f"{len(keys)} tensors"
    )
    assert err == [0.0, 0.0]


def _adalora_model(folder, targets=MLA, seed=1):
    ada = AdaLoraOptions(target_r=2, total_step=10)
    model = _with_adapter(folder, moetune.LoraConfig(r=4, alpha=8, target_modules=targets, adalora=ada), seed)
    for i, (_, layer) in enumerate(svd_layers(model, "default")):  # an allocation's masks: ranks differ per module
        for local, (_, e, _) in layer.svd_triplets("default").items():
            keep = (torch.arange(e.numel()) % (i + 2) != 0).view(e.shape[:-1])
            layer.rank_mask.put(local, keep, persistent=False)
            with torch.no_grad():
                e.masked_fill_(~keep.unsqueeze(-1), 0.0)
    return model


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_adalora_layout_on_kimi_loads_in_peft_on_the_wrapper(kimi, tmp_path):
    folder, _ = kimi
    model = _adalora_model(folder)
    out = save_adalora(model, tmp_path / "ada")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert all(k.startswith(WRAPPED) for k in _keys(out))
    assert all(k.startswith("model.language_model.layers.") for k in cfg["rank_pattern"])
    loaded = peft.PeftModel.from_pretrained(make_hf("kimi_k25"), out).eval()  # peft adapts the model in place
    ids = _ids()
    with torch.no_grad():
        err_peft = (loaded(input_ids=ids).logits - _logits(model, ids)).abs().max().item()
    again = moetune.load_model(folder)
    moetune.load_adapter(again, out)
    err_back = (_logits(again, ids) - _logits(model, ids)).abs().max().item()
    print(f"kimi_k25 AdaLoRA layout: PeftModel on the wrapper max|dlogits| {err_peft:.2e}, moetune back {err_back:.2e}")
    assert err_peft < 1e-5 and err_back < 1e-5


# PEFT 0.21's generic pattern check compares the experts' rank/alpha pattern keys (parameter paths)
# with module names and warns; its target_parameters layers still read them (the logits agree).
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
def test_merge_adapters_on_kimi_keeps_the_wrapper_paths(kimi, tmp_path):
    """``cat`` of an AdaLoRA run's adapter (per-module ranks) and a PEFT-written LoRA whose
    alpha_pattern (wrapper paths) gives its modules different scalings, folded into A: attention and
    routed experts, exact, written with the wrapper's paths, loaded by PEFT on transformers' wrapper."""
    folder, _ = kimi
    targets = [*MLA, "experts"]
    moetune.save_adapter(_adalora_model(folder, targets), tmp_path / "ada")
    plain = _with_adapter(folder, moetune.LoraConfig(r=4, alpha=8, target_modules=targets), seed=2)
    moetune.save_adapter(plain, tmp_path / "plain")
    (tmp_path / "plain" / "moetune_adapter.json").unlink()  # as PEFT writes it: no moetune metadata
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"model.language_model.layers.1.self_attn.kv_b_proj": 2}
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(cfg))
    result = combine_adapter_folders(folder, [tmp_path / "ada", tmp_path / "plain"], tmp_path / "merged", method="cat")
    keys = _keys(result.out_dir)
    assert all(k.startswith(WRAPPED) for k in keys) and any(".experts." in k for k in keys)
    both = moetune.load_model(folder)
    moetune.load_adapter(both, tmp_path / "ada", name="a")
    moetune.load_adapter(both, tmp_path / "plain", name="b")
    moetune.set_adapter(both, ["a", "b"])
    merged = moetune.load_model(folder)
    moetune.load_adapter(merged, result.out_dir)
    ids = _ids()
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(make_hf("kimi_k25"), result.out_dir).eval()
        err_peft = (loaded(input_ids=ids).logits - _logits(both, ids)).abs().max().item()
    err = (_logits(merged, ids) - _logits(both, ids)).abs().max().item()
    print(f"kimi_k25 merge-adapters cat: moetune {err:.2e}, PeftModel on the wrapper {err_peft:.2e}")
    assert err < 1e-5 and err_peft < 1e-5


def test_moe_peft_layout_refuses_a_routed_expert_model_naming_the_module(kimi, tmp_path):
    config = moetune.LoraConfig(
        r=4, target_modules=["gate_proj", "up_proj", "down_proj"], mixture=MixtureConfig(num_experts=3)
    )
    model = _with_adapter(kimi[0], config)
    with pytest.raises(
        AdapterError, match=r"model\.layers\.1\.mlp\.shared_experts: MoE-PEFT's MixLoRA layout holds only"
    ):
        moetune.save_adapter(model, tmp_path / "mp", layout="moe_peft")
    assert not (tmp_path / "mp").exists()
