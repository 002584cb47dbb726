"""Text generation with a KV cache: greedy, or temperature + top-p sampling.

Prompts of different lengths are left-padded into one batch; positions count real tokens only,
so padding does not shift RoPE. Each step feeds only the newest token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


def _pick(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    eos_id: int | None,
    pad_id: int = 0,
    config: SamplingConfig | None = None,
    adapter_names: list[str | None] | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns the new token ids (without the prompt, eos excluded)."""
    cfg = config or SamplingConfig()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache, out = KVCache(), [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    step_ids = ids
    for _ in range(cfg.max_new_tokens):
        logits = model(step_ids, attention_mask=mask, adapter_names=adapter_names, cache=cache).logits[:, -1]
        nxt = _pick(logits, cfg, gen)
        for b, t in enumerate(nxt.tolist()):
            if not done[b] and t != eos_id:
                out[b].append(t)
        done |= nxt == eos_id if eos_id is not None else torch.zeros_like(done)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return out
