"""One MixLoRA FFN, forward + backward: moetune's grouped path vs a per-expert Python loop (the
MoE-PEFT way: shared W1x/W3x, then a loop over experts slicing their tokens) vs a plain LoRA on the
same FFN. Prints one JSON line per case.

    python bench/mixlora_layer.py [--device cuda] [--dtype bf16] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from moetune import LoraConfig
from moetune.config import MixtureConfig
from moetune.model.layers import SwiGLU
from moetune.peft.lora.linear import LoraLinear
from moetune.peft.mixtures.ffn import MixtureFFN


def loop_mixlora(layer: MixtureFFN, name: str, x: torch.Tensor) -> torch.Tensor:
    """Per-expert loop with shared base W1x/W3x (MoE-PEFT's _mixlora_forward, top-k)."""
    mix, s = layer.mixtures[name].mixture, layer.options[name].scaling
    probs = torch.softmax(F.linear(x.float(), layer.router[name]), -1)
    w, idx = torch.topk(probs, mix.top_k, -1)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    g0, u0 = layer.gate_proj(x), layer.up_proj(x)
    out = torch.zeros_like(x)
    for e in range(mix.num_experts):
        tok, slot = torch.where(idx == e)
        xe = x[tok]
        g = g0[tok] + s * F.linear(
            F.linear(xe, layer.lora_A_gate[name][e].to(x.dtype)), layer.lora_B_gate[name][e].to(x.dtype)
        )
        u = u0[tok] + s * F.linear(
            F.linear(xe, layer.lora_A_up[name][e].to(x.dtype)), layer.lora_B_up[name][e].to(x.dtype)
        )
        h = layer.act(g) * u
        y = layer.down_proj(h) + s * F.linear(
            F.linear(h, layer.lora_A_down[name][e].to(x.dtype)), layer.lora_B_down[name][e].to(x.dtype)
        )
        out = out.index_add(0, tok, y * w[tok, slot, None])
    return out


def timed(fn, x, steps: int) -> float:
    for _ in range(2):
        fn(x).float().pow(2).mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x).float().pow(2).mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    ffn = SwiGLU(dim=a.dim, hidden=a.hidden).to(a.device, dtype).requires_grad_(False)
    cfg = LoraConfig(
        r=a.rank, target_modules=["gate_proj"], mixture=MixtureConfig(kind="mixlora", num_experts=a.experts, top_k=2)
    )
    mix = MixtureFFN(ffn)
    mix.add_adapter("m", cfg)
    for p_ in mix.parameters():
        if p_.requires_grad and p_.dim() == 3:
            torch.nn.init.normal_(p_, std=0.02)
    x = torch.randn(a.tokens, a.dim, device=a.device, dtype=dtype, requires_grad=True)
    plain = SwiGLU(dim=a.dim, hidden=a.hidden).to(a.device, dtype).requires_grad_(False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        layer = LoraLinear(getattr(plain, proj))
        layer.add_adapter("l", LoraConfig(r=a.rank * 2, target_modules=[proj]))  # about MixLoRA's active LoRA compute
        setattr(plain, proj, layer)
    cases = {
        "moetune_mixlora": lambda t: mix(t),
        "loop_mixlora": lambda t: loop_mixlora(mix, "m", t),
        "plain_lora_r2x": plain,
    }
    for name, fn in cases.items():
        ms = timed(fn, x, a.steps)
        print(
            json.dumps(
                {
                    "case": name,
                    "ms_fwd_bwd": round(ms, 2),
                    "tokens": a.tokens,
                    "dim": a.dim,
                    "hidden": a.hidden,
                    "experts": a.experts,
                    "top_k": 2,
                    "rank": a.rank,
                    "dtype": a.dtype,
                    "device": a.device,
                    "torch": torch.__version__,
                }
            )
        )


if __name__ == "__main__":
    main()
