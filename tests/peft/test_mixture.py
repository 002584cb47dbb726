"""Mixtures of LoRA experts: fast path == plain reference (forward and every gradient, dropout on),
invariants, per-sample adapters, targeting, router losses and statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moetune
from moetune import LoraConfig
from moetune.config import MixtureConfig
from moetune.errors import AdapterError
from moetune.model.layers import SwiGLU
from moetune.peft.core.layer import AddOptions
from moetune.peft.mixtures.ffn import MixtureFFN
from moetune.peft.mixtures.linear import MixtureLinear
from moetune.peft.mixtures.stats import adapter_router_loss, mixture_metrics
from mixture_reference import RecordingDropout, reference_mixlora, reference_mixture_linear
from tiny_configs import DENSE, MOE, tiny_model

FFN_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _config(routing="top_k", kind="mixlora", dora=False, dropout=0.05, **mix):
    return LoraConfig(
        r=4,
        alpha=8,
        dropout=dropout,
        use_dora=dora,
        target_modules=FFN_TARGETS,
        mixture=MixtureConfig(kind=kind, num_experts=4, routing=routing, **mix),
    )


def _randomise(layer: nn.Module, scale=0.3) -> None:
    """Non-zero B (and perturbed magnitudes) so every path carries a gradient."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name or "moe_lora_B" in name:
                p.normal_(0, scale)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "router" in name:
                p.normal_(0, 0.5)


def _recording_dropout(table) -> RecordingDropout:
    """Adapter ``mix``'s dropout in ``table`` (a layer's dropout dict) replaced by one that records its masks."""
    table["mix"] = drop = RecordingDropout(0.05)
    return drop


def _ffn_layer(config, *, parts=None, seed=0) -> MixtureFFN:
    torch.manual_seed(seed)
    ffn = SwiGLU(dim=32, hidden=48)
    for lin in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
        nn.init.normal_(lin.weight, std=0.2)
    layer = MixtureFFN(ffn)
    layer.add_adapter("mix", config, AddOptions(None if parts is None else frozenset(parts)))
    _randomise(layer)
    for p in ffn.parameters():
        p.requires_grad_(False)
    return layer


def _matches_reference(fast, ref, x, layer):
    """Outputs, and gradients wrt the input and every adapter parameter, agree within 1e-5."""
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    _grads_equal(fast, ref, [x] + [p for _, p in layer.adapter_params("mix")])


def _grads_equal(fast, ref, params):
    gf = torch.autograd.grad(fast, params, grad_outputs=torch.ones_like(fast) * 0.7, allow_unused=True)
    gr = torch.autograd.grad(ref, params, grad_outputs=torch.ones_like(ref) * 0.7, allow_unused=True)
    for a, b in zip(gf, gr):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["top_k", "top_p", "switch", "dense"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mixlora_matches_reference_forward_and_grads_with_dropout(routing, dora):
    layer = _ffn_layer(_config(routing, dora=dora, top_p=0.6, capacity_factor=0.75)).train()
    drop = _recording_dropout(layer.lora_dropout)
    x = torch.randn(2, 9, 32, requires_grad=True)
    fast = layer(x)
    ref = reference_mixlora(layer, "mix", x.reshape(-1, 32), drop).view_as(fast)
    _matches_reference(fast, ref, x, layer)
    assert len(drop.masks) == 2  # one input mask per token, one down-input mask per routed row


@pytest.mark.parametrize("parts", [{"gate_proj"}, {"up_proj", "down_proj"}])
def test_mixlora_on_some_projections(parts):
    layer = _ffn_layer(_config(), parts=parts).train()
    drop = _recording_dropout(layer.lora_dropout)
    x = torch.randn(10, 32, requires_grad=True)
    fast = layer(x)
    ref = reference_mixlora(layer, "mix", x, drop)
    _matches_reference(fast, ref, x, layer)


@pytest.mark.parametrize("kind,routing", [("mola", "top_k"), ("mola", "top_p"), ("loramoe", "dense")])
def test_mixture_linear_matches_reference(kind, routing):
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=True)
    layer = MixtureLinear(lin)
    layer.add_adapter("mix", _config(routing, kind=kind, top_p=0.6))
    _randomise(layer)
    layer.train()
    drop = _recording_dropout(layer.moe_dropout)
    x = torch.randn(11, 32, requires_grad=True)
    fast = layer(x)
    ref = reference_mixture_linear(layer, "mix", x, drop)
    _matches_reference(fast, ref, x, layer)


def _model(cfg=DENSE):
    return tiny_model(cfg).eval()


@pytest.mark.parametrize("cfg,kind", [(DENSE, "mixlora"), (MOE, "mixlora"), (DENSE, "mola"), (MOE, "loramoe")])
def test_new_mixture_leaves_the_model_unchanged(cfg, kind):
    model = _model(cfg)
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).logits
    targets = FFN_TARGETS if cfg is DENSE else ["q_proj", "shared_expert"]
    moetune.add_adapter(
        model, LoraConfig(r=4, target_modules=targets, mixture=MixtureConfig(kind=kind, num_experts=3, top_k=2)), "mix"
    )
    torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=1e-6)
    with moetune.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=1e-6)


def test_targeting_places_wrappers_and_keeps_module_paths():
    model = _model(MOE)
    report = moetune.add_adapter(
        model,
        LoraConfig(r=4, target_modules=["q_proj", "shared_expert"], mixture=MixtureConfig(num_experts=[2, 3])),
        "mix",
    )
    layers = model.model.layers
    assert isinstance(layers[0].mlp.shared_expert, MixtureFFN) and layers[1].mlp.shared_expert.router["mix"].shape == (
        3,
        32,
    )
    assert type(layers[0].self_attn.q_proj).__name__ == "LoraLinear"
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in names  # base keys unchanged
    assert {r.group for r in report.rows} == {"self_attn.q_proj", "mlp.shared_expert"}
    # a plain LoRA can still target the projections inside the mixture FFN
    moetune.add_adapter(model, LoraConfig(r=2, target_modules=["shared_expert.down_proj"]), "plain")
    assert type(layers[0].mlp.shared_expert.down_proj).__name__ == "LoraLinear"


def test_mixture_errors_name_the_problem():
    model = _model(DENSE)
    with pytest.raises(AdapterError, match="no target is a projection"):
        moetune.add_adapter(model, LoraConfig(target_modules=["q_proj"], mixture=MixtureConfig()), "m")
    with pytest.raises(AdapterError, match="num_experts lists 1 counts"):
        moetune.add_adapter(
            model, LoraConfig(target_modules=["gate_proj"], mixture=MixtureConfig(num_experts=[2])), "m"
        )
    moetune.add_adapter(
        model, LoraConfig(target_modules=["gate_proj"], mixture=MixtureConfig(num_experts=2, top_k=1)), "m"
    )
    with pytest.raises(AdapterError, match="cannot be folded"):
        moetune.merge_adapter(model, "m")


def test_mixed_batch_rows_equal_each_adapter_alone():
    """Two mixtures and a plain LoRA in one batch (with padding): every sample's rows equal
    that adapter run alone; each router only counts its own real tokens."""
    model = _model(DENSE)
    moetune.add_adapter(model, _config("top_k", dropout=0.0), "a")
    moetune.add_adapter(model, _config("switch", dropout=0.0, capacity_factor=1.0), "b")
    moetune.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), "c")
    for name in "abc":
        for _, p in moetune.trainable_parameters(model, name).items():
            with torch.no_grad():
                p.normal_(0, 0.2)
    ids = torch.randint(0, 64, (4, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    names = ["a", "b", "a", "c"]
    mixed = model(ids, attention_mask=mask, adapter_names=names)
    for name in "abc":
        rows = [i for i, n in enumerate(names) if n == name]
        alone = model(ids[rows], attention_mask=mask[rows], adapter_names=[name] * len(rows))
        keep = mask[rows].bool()
        torch.testing.assert_close(mixed.logits[rows][keep], alone.logits[keep], atol=1e-5, rtol=1e-5)
        stats = [r.stats for r in mixed.records.values() if r.adapter == name]
        if name != "c":
            assert all(float(s.tokens) == float(mask[rows].sum()) for s in stats)


def test_router_loss_and_metrics():
    model = _model(DENSE).train()
    moetune.add_adapter(model, _config("switch", router_aux_loss_coef=0.5, router_z_loss_coef=0.1), "mix")
    ids = torch.randint(0, 64, (2, 6))
    out = model(ids, labels=ids)
    loss = adapter_router_loss(out.records, "mix")
    stats = [r.stats for r in out.records.values()]
    expected = sum(0.5 * s.balance_loss() + 0.1 * s.z_loss() for s in stats) / len(stats)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.model.layers[0].mlp.router["mix"].grad.abs().sum() > 0
    metrics = mixture_metrics(model, out.records)["mix"]
    assert list(metrics["layers"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert len(metrics["expert_load"][0]) == 4 and abs(sum(metrics["expert_load"][0]) - 1) < 1e-3
    assert all(0 <= h <= torch.log(torch.tensor(4.0)) + 1e-6 for h in metrics["router_entropy"])


def test_activation_checkpointing_keeps_mixture_gradients():
    grads = []
    for ckpt in (False, True):
        model = _model(DENSE).train()
        moetune.add_adapter(model, _config("top_k", dropout=0.0), "mix")
        for p in moetune.trainable_parameters(model).values():
            with torch.no_grad():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        model.set_gradient_checkpointing(ckpt)
        ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
        out = model(ids, labels=ids)
        (out.loss + adapter_router_loss(out.records, "mix")).backward()
        grads.append({k: p.grad.clone() for k, p in moetune.trainable_parameters(model).items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)


def test_stacked_mixtures_without_per_sample_names_are_refused():
    model = _model(DENSE)
    moetune.add_adapter(model, _config(), "a")
    moetune.add_adapter(model, _config(), "b")
    moetune.set_adapter(model, ["a", "b"])
    with pytest.raises(AdapterError, match="pass adapter_names"):
        model(torch.randint(0, 64, (1, 4)))
    model(torch.randint(0, 64, (2, 4)), adapter_names=["a", "b"])  # one adapter per sample is fine


def test_mixture_config_errors_name_field_value_and_allowed(tmp_path):
    from moetune.config import AdapterSection, from_dict, load_train_config
    from moetune.errors import ConfigError

    def error(**kw):
        with pytest.raises(ConfigError) as info:
            from_dict(AdapterSection, kw)
        return str(info.value)

    assert "mixture.top_k must be in [1, num_experts = 4], got 5" in error(
        method="mixlora", mixture={"num_experts": 4, "top_k": 5}
    )
    assert "mixture.routing: expected one of 'top_k', 'top_p', 'switch', 'dense' or null, got 'topk'" in error(
        method="mixlora", mixture={"routing": "topk"}
    )
    assert "unknown key 'mixture.num_expert'" in error(method="mixlora", mixture={"num_expert": 4})
    assert "mixture.routing must be top_k, top_p or dense for kind mola" in error(
        method="mola", mixture={"routing": "switch"}
    )
    assert "mixture needs method mixlora" in error(method="lora", mixture={})
    assert "use_dora: true contradicts method: mixlora (write method: mixdora" in error(method="mixlora", use_dora=True)
    assert from_dict(AdapterSection, {"method": "mixdora"}).use_dora
    run = tmp_path / "run.yaml"
    run.write_text(
        "model: {path: m}\nadapters:\n  - {name: a, method: mixlora, target_modules: [gate_proj]}\n"
        "  - {name: b, optim: {max_steps: 3}}\ndata: {train: t.jsonl}\noptim: {max_steps: 5, batch_size: 2}\n"
        "checkpoint: {output_dir: out}\n"
    )
    cfg = load_train_config(run, ["adapters.0.mixture.top_k=1", "adapters.1.optim.lr=0.1"])
    assert cfg.adapters[0].mixture.top_k == 1 and cfg.adapter_optim(1).lr == 0.1 and cfg.adapter_optim(1).max_steps == 3
    with pytest.raises(ConfigError, match=r"adapters\[1\].optim.warmup_steps must be in \[0, max_steps\]"):
        load_train_config(run, ["optim.warmup_steps=4"])


@pytest.mark.parametrize("routing", ["top_k", "top_p", "switch", "dense"])
def test_adapter_whose_samples_are_all_padding(routing):
    model = _model(DENSE).train()
    kind = "mola" if routing == "dense" else "mixlora"
    moetune.add_adapter(model, _config(routing, kind=kind, expert_capacity=2 if routing == "switch" else None), "a")
    moetune.add_adapter(model, _config("top_k"), "b")
    ids = torch.randint(0, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[0] = 0
    mask[2, 3:] = 0
    out = model(ids, attention_mask=mask, labels=ids, adapter_names=["a", None, "b"])
    out.loss.backward()
    assert {r.adapter for r in out.records.values()} == {"b"}
