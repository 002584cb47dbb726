"""``moetune merge-adapters``: folders in, a PEFT folder out (linears and experts), clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import moetune
from moetune.cli import main
from moetune.config import AdaLoraOptions
from moetune.errors import AdapterError
from moetune.peft.adalora.adapters import svd_layers
from moetune.peft.formats.adalora import save_adalora
from moetune.peft.arithmetic.folders import combine_adapter_folders as merge_adapter_dirs
from tiny_hf import save_hf_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["q_proj", "v_proj", "experts"]


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def _adapter(base, out, seed, targets=TARGETS, **kw):
    """A random (non-zero B) adapter on ``base`` saved at ``out``; returns the model carrying it."""
    model = moetune.load_model(base)
    moetune.add_adapter(model, moetune.LoraConfig(target_modules=targets, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moetune.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    moetune.save_adapter(model, out)
    return model


def _merge_a_and_b(folders, out, *options: str) -> int:
    """``moetune merge-adapters`` of the folders ``a`` and ``b`` on ``base`` into ``out``; the exit status."""
    inputs = ["--model", str(folders / "base"), "--adapter", str(folders / "a"), "--adapter", str(folders / "b")]
    return main(["merge-adapters", *inputs, *options, "--out", str(out)])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    save_hf_model("qwen3_moe", root / "base")
    _adapter(root / "base", root / "a", 1, r=4, alpha=8)
    _adapter(root / "base", root / "b", 2, r=4, alpha=16, use_rslora=True)  # another scaling
    return root


def test_cat_merge_equals_both_adapters_at_once(folders, tmp_path, capsys):
    """``cat`` is exact: the merged adapter's output is base + w_a D_a + w_b D_b (experts included)."""
    out = tmp_path / "merged"
    assert _merge_a_and_b(folders, out, "--method", "cat") == 0
    assert "merged adapter written" in capsys.readouterr().out
    both = moetune.load_model(folders / "base")
    moetune.load_adapter(both, folders / "a", name="a")
    moetune.load_adapter(both, folders / "b", name="b")
    moetune.set_adapter(both, ["a", "b"])
    merged = moetune.load_model(folders / "base")
    moetune.load_adapter(merged, out)
    with torch.no_grad():
        diff = (merged(_ids()).logits - both(_ids()).logits).abs().max().item()
    assert diff < 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    meta = json.loads((out / "moetune_adapter.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and "moetune" not in cfg and meta["merged"]["method"] == "cat"


@pytest.mark.parametrize(
    "method,extra",
    [("linear", []), ("ties", ["--density", "0.5"]), ("dare_ties", ["--density", "0.5"]), ("svd", ["--rank", "3"])],
)
def test_methods_write_adapters_that_moetune_and_peft_load(folders, tmp_path, method, extra):
    peft = pytest.importorskip("peft")
    import transformers

    out = tmp_path / method
    assert _merge_a_and_b(folders, out, "--weights", "0.5", "0.5", "--method", method, *extra) == 0
    ours = moetune.load_model(folders / "base")
    moetune.load_adapter(ours, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders / "base")
    theirs = peft.PeftModel.from_pretrained(hf, out)
    with torch.no_grad():
        assert (ours(_ids()).logits - theirs(_ids()).logits).abs().max() < 1e-4
    if method == "svd":
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 3


def test_mismatches_name_the_first_tensor(folders, tmp_path):
    _adapter(folders / "base", tmp_path / "v_only", 3, targets=["v_proj", "experts"], r=4)
    with pytest.raises(
        AdapterError,
        match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' is in adapter",
    ):
        merge_adapter_dirs(folders / "base", [folders / "a", tmp_path / "v_only"], tmp_path / "x")
    save_hf_model("qwen3", tmp_path / "other")  # head_dim 24: q_proj is (96, 64) there, (64, 64) here
    _adapter(tmp_path / "other", tmp_path / "qwen3_adapter", 4, targets=["q_proj", "v_proj"], r=4)
    with pytest.raises(AdapterError, match=r"q_proj\.lora_B\.weight.*shape \(96, 4\)"):
        merge_adapter_dirs(folders / "base", [folders / "a", tmp_path / "qwen3_adapter"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert _merge_a_and_b(folders, tmp_path / "y", "--method", "ties") == 2  # no density


def test_adalora_layout_folder_merges_as_the_plain_lora_beside_it(tmp_path):
    """An AdaLoRA run's ``adalora/`` folder (peft_type ADALORA) merges exactly as the plain LoRA the
    run writes at the top of its folder; none of PEFT's AdaLoRA keys reach the merged config."""
    save_hf_model("llama", tmp_path / "base")
    ada = _adapter(
        tmp_path / "base",
        tmp_path / "run",
        5,
        targets=["q_proj", "v_proj"],
        r=4,
        alpha=8,
        adalora=AdaLoraOptions(target_r=2, total_step=10),
    )
    for i, (_, layer) in enumerate(svd_layers(ada, "default")):  # an allocation's masks; the first matrix keeps nothing
        keep = torch.arange(4) % (i + 1) != 0 if i else torch.zeros(4, dtype=torch.bool)
        layer.rank_mask.put("default", keep, persistent=False)
        layer.lora_E["default"].data.masked_fill_(~keep.unsqueeze(-1), 0.0)
    moetune.save_adapter(ada, tmp_path / "run")
    save_adalora(ada, tmp_path / "run" / "adalora")
    _adapter(tmp_path / "base", tmp_path / "plain", 6, targets=["q_proj", "v_proj"], r=4, alpha=8)
    for first, out in ((tmp_path / "run", "top"), (tmp_path / "run" / "adalora", "ada")):
        merge_adapter_dirs(tmp_path / "base", [first, tmp_path / "plain"], tmp_path / out, method="cat")
    top, ada_merged = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("top", "ada"))
    assert top.keys() == ada_merged.keys() and all(torch.equal(top[k], ada_merged[k]) for k in top)
    cfg_top, cfg_ada = (
        {k: v for k, v in json.loads((tmp_path / d / "adapter_config.json").read_text()).items() if v is not None}
        for d in ("top", "ada")
    )
    assert cfg_ada == cfg_top and cfg_ada["peft_type"] == "LORA" and "init_r" not in cfg_ada
