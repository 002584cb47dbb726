"""Full LoRA training steps: moetune vs transformers + PEFT on the same MoE config, same run.

Reference shape: Qwen3-30B-A3B layers (hidden 2048, 32 q / 4 kv heads,
head_dim 128, 128 experts top-8, expert hidden 768, vocab 151936), 8 layers, batch 4 x 2048,
LoRA r=16 alpha=32, bf16. Both tools get the same random base weights and the same adapter
weights (moetune saves its freshly initialised adapter, with B made non-zero, and PEFT loads that
file), so their first-step losses must agree within bf16 noise.

Prints one JSON line per (case, tool): tokens/s (median of timed steps after warm-up), peak
memory, MFU against --peak-tflops, first-step loss.

    python bench/train_step.py                      # GPU, reference shape
    python bench/train_step.py --device cpu --tiny  # seconds on CPU (smoke test)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile

import torch

import moetune
from moetune.model.build import build_causal_lm
from moetune.model.families import model_args_from_hf
from harness import parser, peak_gib, reset_peak, timed  # the bench folder's own module

CASES = {
    "attention": dict(modules=["q_proj", "k_proj", "v_proj", "o_proj"], experts=False, ckpt=False),
    "attention+experts": dict(modules=["q_proj", "k_proj", "v_proj", "o_proj"], experts=True, ckpt=False),
    "attention+experts+ckpt": dict(modules=["q_proj", "k_proj", "v_proj", "o_proj"], experts=True, ckpt=True),
}


# Qwen3-MoE shapes: the reference (Qwen3-30B-A3B layers) and a tiny one for a smoke test on CPU.
SHAPES = {
    "reference": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64, vocab_size=512),
}  # fmt: skip


def hf_config(tiny: bool, layers: int):
    from transformers import Qwen3MoeConfig

    layers = 2 if tiny else layers
    return Qwen3MoeConfig(**SHAPES["tiny" if tiny else "reference"], num_hidden_layers=layers, norm_topk_prob=True)


def build_pair(cfg, dtype, device):
    """transformers model with random weights, and a moetune model holding the same tensors."""
    from transformers import AutoModelForCausalLM

    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if device != "cpu" and hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation("grouped_mm")
    args = model_args_from_hf(json.loads(cfg.to_json_string()))
    with torch.device("meta"):
        ours = build_causal_lm(args)
    ours.to(dtype=dtype).to_empty(device=device)
    for m in ours.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    missing = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys[:5]
    return hf, ours


def add_adapters(hf, ours, case, tmp: str):
    """Same LoRA on both: moetune initialises (B non-zero) and saves; PEFT loads the file."""
    from peft import PeftModel

    targets = case["modules"] + (["experts"] if case["experts"] else [])
    moetune.add_adapter(ours, moetune.LoraConfig(r=16, alpha=32, target_modules=targets))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 1e-3)
    moetune.save_adapter(ours, tmp)
    return PeftModel.from_pretrained(hf, tmp, is_trainable=True)


def flops_per_token(args, seq: int) -> float:
    """Frozen-base LoRA step: forward 2N + input-gradient backward 2N, plus causal attention."""
    D, L = args.hidden_size, args.num_layers
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attn_params = D * (2 * q + 2 * kv)
    moe = args.moe
    expert_params = 3 * D * moe.intermediate_size * moe.top_k if moe else 3 * D * args.intermediate_size
    n = L * (attn_params + expert_params) + D * args.vocab_size
    attention = L * 2 * 2 * seq * q * 0.5  # QK^T and AV, causal half
    return 2 * (2 * n + attention)


def run_steps(model, batch, *, steps: int, warmup: int, device: str, ours: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> torch.Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        out = model(ids, labels=labels) if ours else model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    reset_peak(device)
    runs = [timed(step, device) for _ in range(warmup + steps)]
    return statistics.median(seconds for seconds, _ in runs[warmup:]), peak_gib(device), runs[0][1].item()


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--tools", default="moetune,transformers+peft")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak used for MFU (H100 SXM: 989)")
    ns = p.parse_args(argv)
    if ns.tiny:
        ns.batch, ns.seq = min(ns.batch, 2), min(ns.seq, 64)
    dtype = torch.float32 if ns.device == "cpu" else torch.bfloat16
    cfg = hf_config(ns.tiny, ns.layers)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (ns.batch, ns.seq), generator=g).to(ns.device)
    batch = {"input_ids": ids, "labels": ids}
    for name in ns.cases.split(","):
        case = CASES[name]
        hf, ours = build_pair(cfg, dtype, ns.device)
        with tempfile.TemporaryDirectory() as tmp:
            peft_model = add_adapters(hf, ours, case, tmp)
        ours.set_gradient_checkpointing(case["ckpt"])
        if case["ckpt"]:
            peft_model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        ours.train(), peft_model.train()
        fpt = flops_per_token(ours.args, ns.seq)
        for tool in ns.tools.split(","):
            model = ours if tool == "moetune" else peft_model
            try:
                sec, peak, loss = run_steps(
                    model, batch, steps=ns.steps, warmup=ns.warmup, device=ns.device, ours=tool == "moetune"
                )
            except torch.OutOfMemoryError:
                print(json.dumps({"case": name, "tool": tool, "error": "out of memory"}), flush=True)
                torch.cuda.empty_cache()
                continue
            tps = ns.batch * ns.seq / sec
            print(
                json.dumps(
                    {
                        "case": name,
                        "tool": tool,
                        "tokens_per_s": round(tps, 1),
                        "step_ms": round(sec * 1e3, 2),
                        "peak_gib": round(peak, 2),
                        "mfu": round(tps * fpt / (ns.peak_tflops * 1e12), 4),
                        "first_loss": round(loss, 5),
                        "device": ns.device,
                        "torch": torch.__version__,
                    }
                ),
                flush=True,
            )
        del hf, ours, peft_model
        if ns.device != "cpu":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
