"""One MoE block, forward + backward to the input: moetune vs transformers (+ PEFT), eager and compiled.

The block of the reference model (router + 128 experts 2048 -> 768, top-8, 4096 tokens, bf16), with
LoRA r=16 alpha=32 on all routed experts (moetune: split-LoRA grouped GEMMs; PEFT 0.21:
``target_parameters``, which forms ``B @ A`` per expert) or without LoRA. Both tools get the same
base weights, and the script checks their outputs agree before timing (LoRA B starts at zero).
Prints one JSON line per (tool, lora, compiled): median milliseconds, and peak memory on a GPU.

    python bench/moe_block.py                                 # GPU, reference shape
    python bench/moe_block.py --device cpu --tiny --compile-backend eager   # seconds (smoke test)
"""

from __future__ import annotations

import functools
import json
import statistics
import sys

import torch

from moetune.config import LoraConfig
from moetune.model.moe import GroupedExperts, MoEBlock, TopKRouter
from moetune.peft.core.layer import selection_handed
from moetune.peft.lora.experts import LoraGroupedExperts
from harness import parser, peak_gib, reset_peak, synchronize, timed  # the bench folder's own module


def hf_block(cfg, dtype, device):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(cfg).to(device, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    block.requires_grad_(False)
    return block


def peft_lora(block):
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = ["experts.gate_up_proj", "experts.down_proj"]
    return inject_adapter_in_model(PeftLoraConfig(r=16, lora_alpha=32, target_parameters=targets), block)


def our_block(hf, cfg, lora: bool) -> MoEBlock:
    D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    block = MoEBlock(
        gate=TopKRouter(dim=D, num_experts=E, top_k=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob),
        experts=GroupedExperts(num_experts=E, dim=D, hidden=F),
    )
    hf_params = dict(hf.named_parameters())
    for name, p in block.named_parameters():  # same names and layouts as transformers'
        p.data = hf_params[name].detach()
    block.requires_grad_(False)
    if lora:
        block.experts = LoraGroupedExperts(block.experts)
        block.experts.add_adapter("default", LoraConfig(r=16, alpha=32, target_modules=["experts"]))
    return block


def step_fn(block, ours: bool, compiled):
    def step(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        out = block(x)[0] if ours else block(x)
        out.backward(grad)
        return out

    if not ours:
        return compiled(step)
    inner = compiled(step)

    def handed(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        # the expert LoRA reads its adapter selection from an attribute set here, outside the traced code
        with selection_handed(block):
            return inner(x, grad)

    return handed


def _as_is(fn):
    return fn


def time_it(fn, x, grad, *, iters: int, warmup: int, device: str) -> tuple[float, float]:
    for _ in range(warmup):
        fn(x, grad)
    synchronize(device)
    reset_peak(device)
    times = []
    for _ in range(iters):
        x.grad = None
        times.append(timed(lambda: fn(x, grad), device)[0])
    return statistics.median(times) * 1e3, peak_gib(device)


def main(argv=None) -> int:
    from transformers import Qwen3MoeConfig

    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' for a smoke test)")
    ns = p.parse_args(argv)
    dims = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8) if ns.tiny else {}
    cfg = Qwen3MoeConfig(**{"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, **dims})
    cfg.num_experts_per_tok, cfg.norm_topk_prob = 8 if not ns.tiny else 2, True
    tokens = 64 if ns.tiny else ns.tokens
    iters, warmup = (1, 0) if ns.tiny else (ns.iters, ns.warmup)
    dtype = torch.bfloat16
    x0 = torch.randn(1, tokens, cfg.hidden_size, device=ns.device, dtype=dtype, generator=None)
    grad = torch.randn_like(x0)
    for lora in (False, True):
        hf = hf_block(cfg, dtype, ns.device)
        ours = our_block(hf, cfg, lora)
        hf = peft_lora(hf) if lora else hf
        with torch.no_grad():
            diff = (ours(x0)[0].float() - hf(x0).float()).abs().max().item()
        for tool, block in (("moetune", ours), ("transformers+peft" if lora else "transformers", hf)):
            for compiled in (False, True):
                row = {"case": "moe_block", "tool": tool, "lora": lora, "compiled": compiled, "tokens": tokens}
                try:
                    torch._dynamo.reset()
                    wrap = functools.partial(torch.compile, backend=ns.compile_backend) if compiled else _as_is
                    fn = step_fn(block, tool == "moetune", wrap)
                    x = x0.clone().requires_grad_(True)
                    ms, peak = time_it(fn, x, grad, iters=iters, warmup=warmup, device=ns.device)
                    row.update(ms=round(ms, 3), peak_gib=round(peak, 2), max_abs_diff_vs_transformers=diff)
                except Exception as e:  # a failed variant is a row of the table, not the end of the check
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                row.update(device=ns.device, torch=torch.__version__)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
