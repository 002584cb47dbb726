"""GLM-4.5, GLM-4.7-Flash, MiniMax-M2, Mistral 4 and Kimi-K2.x vs transformers 5.17 on tiny random
checkpoints saved by transformers: logits on a padded batch, module names, save_pretrained round
trip, greedy generation with the KV cache, ``moetune inspect``, skipped multi-token-prediction layers."""

from __future__ import annotations

import json

import pytest
import torch

import moetune
from moetune.errors import CheckpointError
from moetune.inspect import inspect_model
from moetune.model.generate import SamplingConfig, generate
from moetune.model.loss import load_balancing_loss, router_stats_of_samples
from tiny_families import CASES, make_hf
from tiny_hf import padded_batch

transformers = pytest.importorskip("transformers")
NAMES = sorted(CASES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (transformers model, its folder, our model loaded from it); built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            hf = make_hf(name)
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            cache[name] = (hf, folder, moetune.load_model(folder))
        return cache[name]

    return get


def _family(name: str) -> str:
    return {"kimi_k25": "deepseek_v3"}.get(name, name)  # Kimi-K2.5's text model is a DeepSeek-V3


def _text(hf):
    """The text model's config (Kimi-K2.5's text_config; the config itself elsewhere)."""
    return hf.config.get_text_config()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, saved):
    hf, _, ours = saved(name)
    ids, mask = padded_batch(_text(hf).vocab_size)
    with torch.no_grad():
        err = (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item()
        # positions count real tokens (as generate does; Mistral 4's query temperature depends on them)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask).logits
    err_pad = (ref[mask.bool()] - got[mask.bool()]).abs().max().item()
    print(f"{name}: max|dlogits| fp32 no pad {err:.2e}, padded {err_pad:.2e}, logit scale {ref.abs().max():.2f}")
    assert err <= 1e-4 and err_pad <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_aux_loss_match_transformers(name, saved):
    """Causal-LM loss on a padded batch with masked labels, and the aux loss where transformers
    computes one when asked (``output_router_logits``: MiniMax-M2 only among these; its loss then
    includes ``router_aux_loss_coef * aux_loss``)."""
    hf, _, ours = saved(name)
    ids, mask = padded_batch(_text(hf).vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    labels[1, 4] = -100  # first real token after left padding: a pad position would predict it
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, output_router_logits=True)
        got = ours(ids, attention_mask=mask, labels=labels)
    aux = getattr(ref, "aux_loss", None)
    assert (aux is not None) == (name == "minimax_m2")
    loss = ref.loss.item() - (0.0 if aux is None else _text(hf).router_aux_loss_coef * aux.item())
    print(
        f"{name}: loss transformers {loss:.6f} moetune {got.loss.item():.6f}, aux transformers "
        f"{None if aux is None else round(aux.item(), 6)} moetune {got.aux_loss.item():.6f}"
    )
    assert abs(loss - got.loss.item()) < 1e-5
    if aux is not None:
        assert abs(aux.item() - got.aux_loss.item()) < 1e-5


def test_minimax_aux_loss_splits_by_sample_and_balancing_reads_the_routed_counts(saved):
    """MiniMax-M2's aux loss counts transformers' bias-free choices in every path the trainer takes
    (whole batch, each job's rows); router-bias balancing and metrics read the experts actually routed."""
    _, _, ours = saved("minimax_m2")
    ids, mask = padded_batch(128)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        for i in range(len(ids)):
            alone = ours(ids[i : i + 1], attention_mask=mask[i : i + 1]).aux_loss
            mine = load_balancing_loss(router_stats_of_samples(out.router_stats, torch.tensor([i]), len(ids)), 8)
            assert abs(mine.item() - alone.item()) < 1e-5, i
    real = mask.reshape(-1).float()[:, None]
    for s in out.router_stats:
        routed = torch.zeros(8).index_add_(0, s.routing.experts.reshape(-1), real.expand(-1, 2).reshape(-1))
        assert torch.equal(s.counts, routed)
    assert any(not torch.equal(s.counts, s.loss_counts) for s in out.router_stats)  # the bias moves choices


@pytest.mark.parametrize("name", NAMES)
def test_names_match_transformers(name, saved):
    """Module paths equal transformers' in memory (so LoRA targets and PEFT adapter keys line up)."""
    hf, _, ours = saved(name)
    theirs = {n for n, _ in hf.named_parameters()} | {n for n, _ in hf.named_buffers() if n.endswith("bias")}
    # MiniMax-M2 keeps its router's correction bias on the MoE block; ours is on the router
    theirs = {n.replace(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias") for n in theirs}
    if name == "kimi_k25":  # the wrapper's text model, without its vision tower and projector
        text = {n for n in theirs if "vision" not in n and "mm_proj" not in n}
        theirs = {n.replace("model.language_model.", "model.") for n in text}
    assert {n for n, _ in ours.named_parameters()} == theirs


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip(name, saved, tmp_path):
    hf, folder, ours = saved(name)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == _family(name)
    cls = transformers.AutoModelForCausalLM if name == "kimi_k25" else type(hf)  # Kimi: its text model alone
    back = cls.from_pretrained(tmp_path / "ours").eval()
    ids, _ = padded_batch(_text(hf).vocab_size)
    with torch.no_grad():
        err = (back(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    print(f"{name}: save_pretrained -> transformers from_pretrained max|dlogits| {err:.2e}")
    assert err <= 1e-5
    again = moetune.load_model(tmp_path / "ours")
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), ours.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(name, saved):
    hf, _, ours = saved(name)
    prompts = [[5, 17, 3, 99, 42, 8], [7, 1, 64]]  # different lengths: left padding in both
    new = 8
    ids = torch.tensor([[0] * (6 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (6 - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None
    )[:, ids.shape[1] :]
    got = generate(ours, prompts, eos_id=None, pad_id=0, config=SamplingConfig(max_new_tokens=new))
    print(f"{name}: greedy tokens transformers {ref.tolist()} moetune {got}")
    assert got == ref.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_inspect_names_the_family(name, saved):
    hf, folder, _ = saved(name)
    report = inspect_model(folder)
    print(report)
    assert f"family            {_family(name)}" in report
    assert ("wrapper           kimi_k25" in report) == (name == "kimi_k25")
    assert "experts           8 routed" in report and "adapter targets" in report


def _copy_with(folder, out, tensors: dict, **text_config):
    """A copy of checkpoint ``folder`` at ``out`` with more ``tensors`` in a second file and
    ``text_config`` set in the text model's config (a wrapper's ``text_config``)."""
    from safetensors.torch import save_file

    out.mkdir(exist_ok=True)
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text.update(text_config)
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(out / "extra.safetensors"))
    return out


def _text_prefix(name: str) -> str:
    return "language_model.model." if name == "kimi_k25" else "model."  # Kimi-K2.5 as released


@pytest.mark.parametrize("name", ["glm4_moe", "glm4_moe_lite", "kimi_k25"])  # the releases that carry MTP layers
def test_multi_token_prediction_layers_are_skipped_by_rule(name, saved, tmp_path, caplog):
    """Layers num_hidden_layers .. + num_nextn_predict_layers - 1 are skipped with one log line;
    a layer past them is still an unknown tensor."""
    hf, folder, _ = saved(name)
    L, pre = _text(hf).num_hidden_layers, _text_prefix(name)
    mtp = {f"{pre}layers.{L}.eh_proj.weight": torch.zeros(4, 4), f"{pre}layers.{L}.enorm.weight": torch.ones(4)}
    _copy_with(folder, tmp_path / "mtp", mtp, num_nextn_predict_layers=1)
    with caplog.at_level("INFO", logger="moetune.model.loading"):
        moetune.load_model(tmp_path / "mtp")
    lines = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(lines) == 1 and f"model.layers.{L} " in lines[0] and "2 tensors" in lines[0], lines
    _copy_with(folder, tmp_path / "mtp", {f"{pre}layers.{L + 1}.eh_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match=f"'{pre}layers.{L + 1}.eh_proj.weight'"):
        moetune.load_model(tmp_path / "mtp")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_tensor_is_an_error_naming_it(name, saved, tmp_path):
    _, folder, _ = saved(name)
    key = f"{_text_prefix(name)}layers.0.mlp.unknown_proj.weight"
    _copy_with(folder, tmp_path / "bad", {key: torch.zeros(2)})
    with pytest.raises(CheckpointError, match=f"'{key}' is not part"):
        moetune.load_model(tmp_path / "bad")


def test_vision_tower_is_skipped_with_one_line(saved, caplog):
    _, folder, _ = saved("kimi_k25")
    with caplog.at_level("INFO", logger="moetune.model.loading"):
        model = moetune.load_model(folder)
    lines = [r.getMessage() for r in caplog.records if "vision" in r.getMessage()]
    assert len(lines) == 1 and "kimi_k25" in lines[0] and "text model only" in lines[0], lines
    assert model.args.family == "deepseek_v3" and model.args.wrapper == "kimi_k25"


def test_kimi_int4_release_loads_its_text_model(saved, tmp_path):
    """Kimi-K2.5 as released: routed experts pack-quantized INT4 (compressed-tensors) under the
    wrapper's key names; the text model loads compact and equals transformers on the decompressed folder."""
    pytest.importorskip("compressed_tensors")
    from quant_fixtures import KIMI_IGNORE, write_int4_dequantized_folder, write_int4_folder

    from moetune.model.quant import quantized_bytes

    _, folder, _ = saved("kimi_k25")
    write_int4_folder(folder, tmp_path / "int4", ignore=[*KIMI_IGNORE, "re:.*vision.*", "re:.*mm_projector.*"])
    write_int4_dequantized_folder(tmp_path / "int4", tmp_path / "dequantized")
    ours = moetune.load_model(tmp_path / "int4")
    stored, elements = quantized_bytes(ours)
    assert 0 < stored < 0.6 * elements  # the routed experts stay INT4 (+ bf16 group scales)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "dequantized", dtype=torch.float32)
    ids, mask = padded_batch(_text(ref).vocab_size)
    with torch.no_grad():
        err = (ref.eval()(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    print(f"kimi_k25 INT4 release: moetune vs transformers on the decompressed folder max|dlogits| {err:.2e}")
    assert err <= 1e-4


def test_text_only_kimi_k2_reads_as_deepseek_v3(tmp_path):
    """Kimi-K2 / K2-Thinking folders say model_type kimi_k2: DeepSeek-V3 under another name."""
    from tiny_deepseek import make_hf as make_deepseek

    hf = make_deepseek("v3_groups_yarn")
    hf.save_pretrained(tmp_path / "k2")
    cfg = json.loads((tmp_path / "k2" / "config.json").read_text())
    (tmp_path / "k2" / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    ours = moetune.load_model(tmp_path / "k2")
    ids, _ = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids).logits).abs().max() <= 1e-4
    assert ours.args.family == "deepseek_v3" and ours.args.hf_config["model_type"] == "kimi_k2"


@pytest.mark.parametrize("name", ["glm4_moe", "minimax_m2"])
def test_fp8_release_matches_transformers(name, saved, tmp_path):
    """GLM-4.5-FP8 and MiniMax-M2 are released block-FP8: read as stored, equal to transformers on the
    dequantized folder (MiniMax's router stays full precision, as in its release)."""
    from quant_fixtures import write_dequantized_folder, write_fp8_folder
    from safetensors.torch import load_file, save_file

    hf, folder, _ = saved(name)
    write_fp8_folder(folder, tmp_path / "fp8")
    tensors, full = load_file(str(tmp_path / "fp8" / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    for key in [k for k in tensors if k.endswith("block_sparse_moe.gate.weight")]:
        tensors[key] = full[key]
        del tensors[key + "_scale_inv"]
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    write_dequantized_folder(tmp_path / "fp8", tmp_path / "dequantized")
    ours = moetune.load_model(tmp_path / "fp8")
    ref = type(hf).from_pretrained(tmp_path / "dequantized", dtype=torch.float32).eval()
    ids, _ = padded_batch(_text(hf).vocab_size)
    with torch.no_grad():
        err = (ref(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    print(f"{name}: FP8 release vs transformers on the dequantized folder max|dlogits| {err:.2e}")
    assert err <= 1e-4
