"""``torch.compile`` of each decoder block's forward with ``fullgraph=True`` (what ``train.compile``
does, per block as torchtitan does) with LoRA on attention and routed experts (issue 19): no graph
break in any family, and compiled == eager, forward and gradients, two adapters chosen per sample.

The break counts use ``torch._dynamo.explain`` (as litgpt tests it) on each block's forward while
the block's hooks have handed its adapter layers the forward's selection, as in a compiled run.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import moetune
from moetune.model import build_random_model, model_args_from_hf
from moetune.peft.core.params import trainable_parameters
from moetune.tiny_models import COMMON, TINY_CONFIGS, tiny_model_args
from tiny_families import CASES as NEW_FAMILIES
from tiny_hf import CASES as CLASSIC
from tiny_hybrid import CASES as HYBRID

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GQA = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
ATTENTION = {
    "deepseek_v2": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "deepseek_v3": MLA,
    "glm4_moe_lite": MLA,
    "mistral4": MLA,
    "qwen3_next": GQA + ["in_proj_qkvz", "in_proj_ba", "out_proj"],
    "qwen3_5_moe": GQA + ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"],
}
ATTENTION["hybrid"] = ATTENTION["qwen3_5_moe"]
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "glm4_moe"]
FAMILIES += ["glm4_moe_lite", "mistral4", "minimax_m2", "qwen3_next", "qwen3_5_moe"]


def _args(family: str):
    if family == "hybrid":  # Qwen3.5-MoE in two layers: one gated DeltaNet, one gated attention
        layers = {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}
        return model_args_from_hf({**COMMON, **TINY_CONFIGS["qwen3_5_moe"], "vocab_size": 64, **layers})
    if family in TINY_CONFIGS:
        return tiny_model_args(family)
    config_class, _, kwargs = {**CLASSIC, **NEW_FAMILIES, **HYBRID}[family]
    return model_args_from_hf(getattr(transformers, config_class)(**kwargs).to_dict(), where=family)


def _model(family: str, dtype: torch.dtype, *, adapters: int = 1, dropout: float = 0.0):
    model = build_random_model(_args(family), seed=0, std=0.1).to(dtype)
    targets = ATTENTION.get(family, GQA) + ["experts"]
    for name, r in (("a", 4), ("b", 8))[:adapters]:
        moetune.add_adapter(model, moetune.LoraConfig(r=r, alpha=8, dropout=dropout, target_modules=targets), name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def _batch(vocab: int):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("adapters", [1, 2], ids=["one-adapter", "adapters-per-sample"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_compiles_without_a_graph_break(family, adapters):
    """bf16, LoRA with dropout on attention and experts; with two adapters chosen per sample the
    experts run the stacked products on rows the dispatch sorted by adapter."""
    model = _model(family, torch.bfloat16, adapters=adapters, dropout=0.1)
    breaks = []

    def explain(block, args, kwargs):  # runs after peft's block hook: the adapter layers hold the selection
        torch._dynamo.reset()
        result = torch._dynamo.explain(block.forward)(*args, **kwargs)
        breaks.append((result.graph_break_count, [str(r.reason).splitlines()[0] for r in result.break_reasons]))

    blocks = _one_block_per_mixer(model)
    for block in blocks:
        block.register_forward_pre_hook(explain, with_kwargs=True)
    ids, mask, labels = _batch(model.args.vocab_size)
    model(ids, attention_mask=mask, labels=labels, adapter_names=["b", "a"] if adapters == 2 else None)
    assert len(breaks) == len(blocks)
    assert all(count == 0 for count, _ in breaks), breaks


def _one_block_per_mixer(model) -> list:
    """A block of each token-mixer kind (attention, linear attention), an MoE block where there is
    one (the dense-FFN blocks carry no other adapter code): what compiles differently."""
    chosen = {}
    for block in model.model.layers:
        kind = type(getattr(block, block.attn_name))
        if kind not in chosen or (block.is_moe and not chosen[kind].is_moe):
            chosen[kind] = block
    return list(chosen.values())


def _step(model, adapter_names):
    model.zero_grad()
    ids, mask, labels = _batch(model.args.vocab_size)
    out = model(ids, attention_mask=mask, labels=labels, adapter_names=adapter_names)
    (out.loss + 0.01 * out.aux_loss).backward()
    return out.loss.detach(), {k: p.grad.clone() for k, p in trainable_parameters(model).items()}


def test_compiled_blocks_equal_eager_forward_and_gradients_fp32():
    """Qwen3.5-MoE: gated DeltaNet, gated attention, routed experts (the grouped GEMM runs as one
    opaque op in compiled fp32 code: dynamo's meta kernel takes bf16 only), two adapters chosen per
    sample; fullgraph=True makes any graph break an error here too."""
    torch._dynamo.reset()
    model = _model("hybrid", torch.float32, adapters=2)
    names = ["b", "a"]
    loss, grads = _step(model, names)
    model.compile_blocks(backend="aot_eager")
    compiled_loss, compiled_grads = _step(model, names)
    assert abs(float(loss - compiled_loss)) <= 1e-5
    assert grads.keys() == compiled_grads.keys()
    gaps = {k: float((grads[k] - compiled_grads[k]).abs().max()) for k in grads}
    assert max(gaps.values()) <= 1e-5, gaps
    assert any(".b" in k and float(g.abs().max()) > 0 for k, g in compiled_grads.items())
