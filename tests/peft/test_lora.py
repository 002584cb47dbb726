"""LoRA on linears: invariants, exact gradients, per-sample adapters, targeting, files, merging."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import moetune
from moetune import LoraConfig
from moetune.errors import AdapterError
import moetune.peft.formats.folder as peft_io
from moetune.model.saving import native_state_dict
from moetune.peft.core.layer import adapter_layers, disable_adapters
from moetune.peft.core.params import trainable_parameters
from moetune.peft.core.targets import targetable_names
from moetune.peft.lora.linear import LoraLinear
from tiny_configs import DENSE, MOE, tiny_model

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "shared_expert", "lm_head"]


def _model(cfg=MOE, **kw):
    return tiny_model(cfg, **kw).eval()


def _ids(batch=3, seq=7, vocab=64, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randomise(model, name=None, scale=0.1):
    """Non-zero A and B (and a perturbed DoRA magnitude), as after some training."""
    with torch.no_grad():
        for key, p in trainable_parameters(model, name).items():
            if "magnitude" in key:
                p.mul_(1 + scale * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * scale)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# --- invariants ----------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_zero_b_reproduces_base_logits_exactly(dora):
    model, ids = _model(), _ids()
    base = _logits(model, ids)
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=LINEARS, use_dora=dora))
    assert torch.equal(_logits(model, ids), base)


def test_one_step_changes_only_adapter_parameters():
    model, ids = _model(), _ids()
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=LINEARS, use_dora=True))
    _randomise(model)
    adapter = trainable_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapter.values()}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)
    assert any("lora_magnitude_vector" in k for k in changed)  # DoRA's magnitude is trained


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_roundtrip_and_merged_logits(dora):
    model, ids = _model(), _ids()
    base_weights = {k: v.clone() for k, v in native_state_dict(model).items()}
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=LINEARS, use_dora=dora))
    _randomise(model)
    unmerged = _logits(model, ids)
    moetune.merge_adapter(model)
    moetune.merge_adapter(model)  # idempotent
    merged = _logits(model, ids)
    err = (merged - unmerged).abs().max().item()
    print(f"merged vs unmerged (dora={dora}): max|dlogits| {err:.2e}")
    assert err <= 1e-5
    for _, layer in adapter_layers(model):
        layer.unmerge("default")
    now = native_state_dict(model)
    worst = max((now[k] - base_weights[k]).abs().max().item() for k in base_weights)
    print(f"unmerge restores base: max|dW| {worst:.2e}")
    assert worst <= 1e-6
    assert torch.allclose(_logits(model, ids), unmerged, atol=1e-5)


def test_two_adapters_merged_and_unmerged_in_any_order():
    layer = LoraLinear(nn.Linear(16, 12))
    w0 = layer.base_layer.weight.detach().clone()
    layer.add_adapter("plain", LoraConfig(r=3, target_modules=["x"]))
    layer.add_adapter("dora", LoraConfig(r=2, target_modules=["x"], use_dora=True))
    with torch.no_grad():
        for _, p in layer.adapter_params():
            p.add_(torch.randn_like(p) * 0.2)
    layer.active = ["plain", "dora"]
    x = torch.randn(5, 16)
    want = layer(x)
    layer.merge("dora")
    layer.merge("plain")
    assert torch.allclose(layer(x), want, atol=1e-5)
    layer.unmerge("dora")  # not the last one merged
    assert torch.allclose(layer(x), want, atol=1e-5)
    layer.unmerge("plain")
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_gradients_equal_plain_autograd_on_same_mask(dora):
    p = 0.1
    layer = LoraLinear(nn.Linear(24, 20))
    layer.add_adapter("default", LoraConfig(r=4, dropout=p, target_modules=["x"], use_dora=dora))
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.3)
    layer.active = ["default"]
    layer.train()
    x = torch.randn(2, 9, 24, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(123)
    mask = F.dropout(torch.ones_like(x), p, training=True)  # the same Bernoulli draw
    assert (mask == 0).any()
    # reference: the formula written out with plain autograd
    xr = x.detach().clone().requires_grad_(True)
    a = layer.lora_A["default"].detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].detach().clone().requires_grad_(True)
    w, bias, s = layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), layer.scaling["default"]
    xd = xr * mask
    lora = xd @ a.T @ b.T
    ref = xr @ w.T + bias
    params = [xr, a, b]
    if dora:
        m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_(True)
        norm = torch.linalg.norm(w + s * (b @ a).detach(), dim=1).detach()
        ref = ref + (m / norm - 1) * (xd @ w.T) + (m / norm) * lora * s
        params.append(m)
    else:
        ref = ref + lora * s
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-6)
    ours = [x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad]
    if dora:
        ours.append(layer.lora_magnitude_vector["default"].grad)
    for mine, theirs in zip(ours, [q.grad for q in params]):
        assert torch.allclose(mine, theirs, atol=1e-6, rtol=1e-5)


def test_scaling_and_inits():
    layer = LoraLinear(nn.Linear(256, 128))
    layer.add_adapter("k", LoraConfig(r=16, alpha=32, target_modules=["x"]))
    layer.add_adapter("rs", LoraConfig(r=16, alpha=32, use_rslora=True, init="gaussian", target_modules=["x"]))
    assert layer.scaling["k"] == 2.0 and layer.scaling["rs"] == 32 / 4
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256, as nn.Linear
    assert layer.lora_A["k"].abs().max() <= bound and layer.lora_A["k"].abs().max() > 0.8 * bound
    assert abs(layer.lora_A["rs"].std().item() - 1 / 16) < 0.01  # PEFT's gaussian: std 1/r
    assert not layer.lora_B["k"].any() and not layer.lora_B["rs"].any()
    assert layer.lora_A["k"].dtype == torch.float32


def test_fp32_adapter_on_bf16_base_computes_in_input_dtype():
    layer = LoraLinear(nn.Linear(16, 8).to(torch.bfloat16))
    layer.add_adapter("default", LoraConfig(r=2, target_modules=["x"], use_dora=True))
    layer.active = ["default"]
    assert layer.lora_A["default"].dtype == torch.float32
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# --- per-sample adapters -------------------------------------------------------------------
def _two_adapter_model():
    model = _model()
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=LINEARS), name="a")
    moetune.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "lm_head"], use_dora=True), name="b")
    _randomise(model, scale=0.3)
    return model


def test_mixed_adapter_batch_equals_each_sample_alone():
    model, ids = _two_adapter_model(), _ids(batch=4)
    names = ["a", None, "b", "a"]
    mixed = _logits(model, ids, adapter_names=names)
    for i, n in enumerate(names):
        if n is None:
            with disable_adapters(model):
                alone = _logits(model, ids[i : i + 1])
        else:
            moetune.set_adapter(model, n)
            alone = _logits(model, ids[i : i + 1])
        assert (mixed[i] - alone[0]).abs().max() <= 1e-5, (i, n)
    assert not torch.allclose(mixed[1], mixed[0])  # the adapters do change the output


def test_mixed_adapter_loss_and_gradients_match_logits_path():
    """The chunked loss runs lm_head on filtered rows (and again in backward): per-sample LoRA
    there must give the same loss and adapter gradients as full logits + cross-entropy.

    In float64: the two paths run each adapter's head LoRA on different row blocks (a chunk's
    rows vs a sample's), so in fp32 they round differently, and the randomised adapters (scale
    0.3) amplify that to ~3e-5 in layer-0 gradients (each fp32 path is that far from float64)."""
    model, ids = _two_adapter_model().double(), _ids(batch=3, seq=9)
    model.loss_chunk_size = 5
    names = ["b", "a", None]
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels, adapter_names=names)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in trainable_parameters(model).items()}
    model.zero_grad()
    logits = model(ids, adapter_names=names).logits
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=-100)
    ref.backward()
    assert abs(out.loss.item() - ref.item()) < 1e-6  # the loss's cross-entropy runs in fp32
    for k, p in trainable_parameters(model).items():
        assert torch.allclose(grads[k], p.grad, atol=1e-10), k


def test_per_sample_selection_refused_while_merged():
    model = _two_adapter_model()
    moetune.merge_adapter(model, "a")
    with pytest.raises(AdapterError, match="merged"):
        model(_ids(), adapter_names=["a", "b", None])


# --- targeting -----------------------------------------------------------------------------
def _wrapped(model, name="default"):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLinear) and name in m.adapter_names)


def test_suffix_dotted_container_and_all_linear_targets():
    model = _model()
    moetune.add_adapter(model, LoraConfig(target_modules=["q_proj", "shared_expert"]), name="s")
    assert _wrapped(model, "s") == sorted(
        [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
        + [f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    )
    moetune.add_adapter(model, LoraConfig(target_modules="all-linear"), name="all")
    got = _wrapped(model, "all")
    assert "lm_head" not in got and not any(p.endswith("shared_expert_gate") for p in got)
    assert len(got) == 2 * 7  # q k v o + shared gate/up/down
    # the q_proj wrappers now hold both adapters in one wrapper
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, LoraLinear) and q.adapter_names == ["s", "all"]
    assert not isinstance(q.base_layer, LoraLinear)
    moetune.add_adapter(model, LoraConfig(target_modules=["all-linear", "lm_head", "shared_expert_gate"]), name="more")
    assert "lm_head" in _wrapped(model, "more") and "model.layers.1.mlp.shared_expert_gate" in _wrapped(model, "more")


def test_dotted_suffix_layers_to_transform_and_regex():
    dense = _model(DENSE)
    moetune.add_adapter(dense, LoraConfig(target_modules=["mlp.down_proj", "lm_head"], layers_to_transform=[1]))
    assert _wrapped(dense) == ["lm_head", "model.layers.1.mlp.down_proj"]
    moetune.add_adapter(dense, LoraConfig(target_regex=r"model\.layers\.0\.self_attn\.(q|v)_proj"), name="re")
    assert _wrapped(dense, "re") == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_unmatched_target_is_an_error_listing_targetable_names():
    model = _model()
    with pytest.raises(AdapterError) as err:
        moetune.add_adapter(model, LoraConfig(target_modules=["q_proj", "qproj"]))
    msg = str(err.value)
    assert "'qproj'" in msg and "did you mean 'q_proj'" in msg
    for name in ("q_proj", "o_proj", "shared_expert", "lm_head"):
        assert name in msg
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing half-added
    with pytest.raises(AdapterError, match="layers_to_transform"):
        moetune.add_adapter(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(AdapterError, match="TopKRouter"):
        moetune.add_adapter(model, LoraConfig(target_modules=["gate"]))
    with pytest.raises(AdapterError, match="target_regex"):
        moetune.add_adapter(model, LoraConfig(target_regex="nothing.*"))


def test_targetable_names_lists_suffixes():
    names = targetable_names(_model())
    for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert", "lm_head"):
        assert n in names
    if "experts" in names:
        assert {"experts.gate_proj", "experts.up_proj", "experts.down_proj"} <= set(names)


def test_expert_part_targets_go_to_the_expert_wrapper():
    pytest.importorskip("moetune.peft.lora.experts")
    model = _model()
    moetune.add_adapter(model, LoraConfig(target_modules=["experts.down_proj", "q_proj"]))
    ex = model.get_submodule("model.layers.0.mlp.experts")
    assert ex.adapter_names == ["default"] and ex.pairs("default") == ["down"]
    moetune.add_adapter(model, LoraConfig(target_modules=["experts.gate_proj", "experts.up_proj"]), name="gu")
    assert ex.pairs("gu") == ["gate_up"]
    report = moetune.add_adapter(model, LoraConfig(target_modules=["experts"]), name="all")
    assert ex.pairs("all") == ["gate_up", "down"]
    assert [r.group for r in report.rows] == ["mlp.experts"]


def test_adapter_names_selection_and_deletion():
    model, ids = _model(), _ids()
    base = _logits(model, ids)
    report = moetune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), name="x")
    assert report.trainable == sum(p.numel() for p in trainable_parameters(model, "x").values())
    assert "self_attn.q_proj" in str(report) and "lm_head" in str(report)
    with pytest.raises(AdapterError, match="already exists"):
        moetune.add_adapter(model, LoraConfig(target_modules=["q_proj"]), name="x")
    with pytest.raises(AdapterError, match="letters"):
        moetune.add_adapter(model, LoraConfig(target_modules=["q_proj"]), name="a.b")
    with pytest.raises(AdapterError, match="no adapter named 'y'"):
        moetune.set_adapter(model, "y")
    _randomise(model)
    assert not torch.equal(_logits(model, ids), base)
    moetune.delete_adapter(model, "x")
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert torch.equal(_logits(model, ids), base)


def test_pissa_keeps_output_changes_base_and_delete_restores_it():
    model, ids = _model(), _ids()
    w = model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach().clone()
    base = _logits(model, ids)
    moetune.add_adapter(model, LoraConfig(r=4, init="pissa", target_modules=["q_proj", "o_proj"]))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not torch.allclose(layer.base_layer.weight, w, atol=1e-3)  # the base weight changes
    assert torch.allclose(_logits(model, ids), base, atol=1e-5)
    with pytest.raises(AdapterError, match="only adapter"):
        moetune.add_adapter(model, LoraConfig(target_modules=["q_proj"]), name="other")
    moetune.delete_adapter(model, "default")
    assert (model.get_submodule("model.layers.0.self_attn.q_proj").weight - w).abs().max() < 1e-6


def test_pissa_refused_on_tied_lm_head():
    model = _model(DENSE, tie_word_embeddings=True)
    with pytest.raises(AdapterError, match="tied"):
        moetune.add_adapter(model, LoraConfig(r=2, init="pissa", target_modules=["lm_head"]))
    moetune.add_adapter(model, LoraConfig(r=2, target_modules=["lm_head"]))  # plain LoRA is fine
    _randomise(model)
    with pytest.raises(AdapterError, match="tied"):
        moetune.merge_adapter(model)


# --- files ---------------------------------------------------------------------------------
def test_save_load_roundtrip_native(tmp_path):
    model, ids = _model(), _ids()
    moetune.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=LINEARS, use_dora=True, layers_to_transform=[1]))
    _randomise(model)
    want = _logits(model, ids)
    out = moetune.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    meta = json.loads((out / "moetune_adapter.json").read_text())  # moetune's own metadata, beside PEFT's config
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] and cfg["r"] == 4 and meta["lora_config"]["r"] == 4
    assert "moetune" not in cfg and meta["adapter_name"] == "default" and meta["layout"] == "peft"
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector" in keys
    assert not any(".layers.0." in k for k in keys)
    fresh = _model()
    moetune.load_adapter(fresh, out)
    assert torch.equal(_logits(fresh, ids), want)


def test_pissa_saved_as_plain_lora_on_original_base(tmp_path):
    model, ids = _model(), _ids()
    moetune.add_adapter(model, LoraConfig(r=3, alpha=6, init="pissa", target_modules=["q_proj", "down_proj"]))
    _randomise(model)  # "training" moves A and B away from their init
    want = _logits(model, ids)
    out = moetune.save_adapter(model, tmp_path / "pissa")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 12 and cfg["init_lora_weights"] is True
    fresh = _model()  # untouched base weights
    moetune.load_adapter(fresh, out)
    err = (_logits(fresh, ids) - want).abs().max().item()
    print(f"pissa converted file on the original base: max|dlogits| {err:.2e}")
    assert err < 1e-5


def test_save_never_half_overwrites(tmp_path, monkeypatch):
    model = _model()
    moetune.add_adapter(model, LoraConfig(target_modules=["q_proj"]))
    out = moetune.save_adapter(model, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_io, "save_file", boom)
    _randomise(model)
    with pytest.raises(OSError):
        moetune.save_adapter(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary folder left


def _saved(tmp_path):
    model = _model()
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return moetune.save_adapter(model, tmp_path / "ad")


def test_unknown_tensor_key_is_an_error_naming_it(tmp_path):
    out = _saved(tmp_path)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    model = _model()
    with pytest.raises(
        AdapterError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight' maps to no"
    ):
        moetune.load_adapter(model, out)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # rolled back


def test_wrong_shape_names_tensor_expected_and_found(tmp_path):
    out = _saved(tmp_path)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(40, 4)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterError) as err:
        moetune.load_adapter(_model(), out)
    msg = str(err.value)
    assert key in msg and "(40, 4)" in msg and "(16, 4)" in msg


def test_missing_tensor_and_pickled_adapter_are_refused(tmp_path):
    out = _saved(tmp_path)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"q_proj\.lora_B\.weight: missing"):
        moetune.load_adapter(_model(), out)
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="pickled adapter.*safetensors only"):
        moetune.load_adapter(_model(), out)
    with pytest.raises(AdapterError, match="does not exist"):
        moetune.load_adapter(_model(), tmp_path / "nope")


@pytest.mark.parametrize(
    "text,found",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", r"found \[1, 2\]"),
        ('{"lora_config": 4}', "'lora_config' is 4, not an object"),
    ],
)
def test_malformed_metadata_file_is_one_error_naming_it(tmp_path, text, found):
    out = _saved(tmp_path)
    (out / "moetune_adapter.json").write_text(text)
    model = _model()
    with pytest.raises(AdapterError, match=rf"moetune_adapter\.json: {found}.*expected a JSON object with moetune's"):
        moetune.load_adapter(model, out)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_unsupported_peft_options_are_refused(tmp_path):
    out = _saved(tmp_path)
    cfg = json.loads((out / "adapter_config.json").read_text())
    for key, value, pattern in [
        ("lora_bias", True, "lora_bias"),
        ("peft_type", "IA3", "peft_type"),
        ("init_lora_weights", "olora", "olora"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
    ]:
        (out / "adapter_config.json").write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(AdapterError, match=pattern):
            moetune.load_adapter(_model(), out)


def test_merge_then_save_pretrained_is_a_plain_checkpoint(tmp_path):
    model, ids = _model(), _ids()
    moetune.add_adapter(model, LoraConfig(r=4, target_modules=LINEARS, use_dora=True))
    _randomise(model)
    want = _logits(model, ids)
    moetune.merge_adapter(model)
    model.save_pretrained(tmp_path / "merged")
    plain = moetune.load_model(tmp_path / "merged")
    assert (_logits(plain, ids) - want).abs().max() <= 1e-5
    moetune.merge_adapter(_two_adapter_model(), "a", unload=True)  # unload keeps other adapters working
