"""Saved activations of one bf16 LoRA training step: moetune vs transformers + PEFT, same shape.

Device-independent: every tensor autograd saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``; the hook records its storage once (a tensor saved by
several ops, or a view of one already saved, counts once; base weights do not count). The bytes
saved inside the decoder layers, divided by tokens and layers, are the per-token-per-layer figure;
the rest (embedding, final norm, LM head and loss) is reported apart, since transformers keeps the
full fp32 logits and moetune's chunked loss keeps none. What activation checkpointing holds as a
checkpointed function's inputs is not a saved tensor and is not seen (so only the case without
checkpointing is measured).

Shape (issue 19): Qwen3-30B-A3B layer shapes (hidden 2048, 32 q / 4 kv heads, head_dim 128,
expert hidden 768, top-8, vocab 151936) with 4 layers and 64 experts, one sequence of 2048 tokens,
LoRA r=16 on q,k,v,o and all routed experts; transformers runs its grouped_mm experts.

    python bench/saved_activations.py           # the shape above: ~8 GB of bf16 weights, minutes on CPU
    python bench/saved_activations.py --small   # seconds: hidden 256, 16 experts, 256 tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import CASES, add_adapters, build_pair  # noqa: E402 - the bench folder's own module


def hf_config(small: bool, layers: int, experts: int):
    from transformers import Qwen3MoeConfig

    heads, kv_heads, head_dim, width, expert_width = (4, 2, 64, 256, 128) if small else (32, 4, 128, 2048, 768)
    dims = dict(
        hidden_size=width,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        moe_intermediate_size=expert_width,
    )
    return Qwen3MoeConfig(
        **dims,
        num_experts=16 if small else experts,
        num_experts_per_tok=8,
        intermediate_size=4 * dims["hidden_size"],
        vocab_size=4096 if small else 151936,
        num_hidden_layers=layers,
        norm_topk_prob=True,
    )


def saved_bytes(model, layers, run) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves while ``run()`` does one forward.

    Returns:
        ``{"layers": bytes saved inside ``layers``, "other": the rest}``.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}
    region = ["other"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in weights and ptr not in seen:
            seen[ptr] = (storage.nbytes(), region[0])
        return t

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda *_: region.__setitem__(0, "layers")))
        handles.append(layer.register_forward_hook(lambda *_: region.__setitem__(0, "other")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out
    finally:
        for h in handles:
            h.remove()
    return {r: sum(b for b, where in seen.values() if where == r) for r in ("layers", "other")}


def measure(cfg, *, tokens: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Saved bytes of one training forward for each tool, and their ratio per token per layer."""
    hf, ours = build_pair(cfg, dtype, "cpu")
    shared = hf.state_dict()
    for name, p in ours.named_parameters():  # one copy of the base weights (saved bytes do not depend on it)
        p.data = shared[name]
    del shared
    if hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation("grouped_mm")  # transformers' fast experts (CPU has grouped_mm too)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model = add_adapters(hf, ours, CASES["attention+experts"], tmp)
    ours.train(), peft_model.train()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    runs = {
        "moetune": (ours, ours.model.layers, lambda: ours(ids, labels=ids).loss),
        "transformers+peft": (
            peft_model,
            peft_model.base_model.model.model.layers,
            lambda: peft_model(input_ids=ids, labels=ids).loss,
        ),
    }
    layers, rows = cfg.num_hidden_layers, []
    for tool, (model, blocks, run) in runs.items():
        b = saved_bytes(model, blocks, run)
        rows.append(
            {
                "tool": tool,
                "bytes_per_token_per_layer": round(b["layers"] / (tokens * layers)),
                "layers_mib": round(b["layers"] / 2**20, 1),
                "outside_layers_mib": round(b["other"] / 2**20, 1),
                "total_mib": round((b["layers"] + b["other"]) / 2**20, 1),
                "shape": {"layers": layers, "experts": cfg.num_experts, "tokens": tokens, "hidden": cfg.hidden_size},
                "dtype": str(dtype).removeprefix("torch."),
                "torch": torch.__version__,
            }
        )
    ratio = rows[0]["bytes_per_token_per_layer"] / rows[1]["bytes_per_token_per_layer"]
    total = (rows[0]["total_mib"] / rows[1]["total_mib"]) if rows[1]["total_mib"] else float("nan")
    rows.append({"ratio_per_layer": round(ratio, 3), "ratio_whole_step": round(total, 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="toy shape, seconds on CPU")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048)
    ns = p.parse_args(argv)
    cfg = hf_config(ns.small, ns.layers, ns.experts)
    for row in measure(cfg, tokens=min(ns.tokens, 256) if ns.small else ns.tokens):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
