"""Small building blocks: RMSNorm, rotary embeddings (default, linear, llama3, YaRN), SwiGLU MLP.

Shapes: B batch, T tokens, D model dim, H heads, Dh head dim, F FFN hidden.
Numerics follow transformers exactly (norm in fp32, cast back before the weight multiply; RoPE
tables in fp32), because parity with it is tested to 1e-4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import RopeArgs

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim, in fp32 (every RMS norm's first step)."""
    h = x.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd.Function signature
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd.Function signature
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, with its gradient made contiguous on the way back (for backward kernels that reject
    or mis-lay-out a strided gradient: grouped_mm refuses stride-0 ones, as a ``.sum()`` loss gives)."""
    return _ContiguousGrad.apply(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32."""

    # the weight that leaves the normalised input unchanged (a random model starts there)
    neutral_weight = 1.0

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), self.neutral_weight))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps).to(x.dtype)


def _yarn_inv_freq(rope: RopeArgs, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base, orig = rope.theta, rope.original_max_position_embeddings or max_pos
    factor = rope.factor if rope.factor is not None else max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.attention_factor
    if attn is None:
        attn = (
            mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
            if rope.mscale and rope.mscale_all_dim
            else mscale(factor)
        )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attn)


def _llama3_inv_freq(rope: RopeArgs, inv: torch.Tensor, max_pos: int) -> torch.Tensor:
    factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings or max_pos
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(rope: RopeArgs, head_dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (Dh_rot/2,) and the cos/sin scale for the configured RoPE variant."""
    dim = int(head_dim * rope.partial_rotary_factor)
    if rope.kind == "yarn":
        return _yarn_inv_freq(rope, dim, max_pos)
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        inv = _llama3_inv_freq(rope, inv, max_pos)
    return inv, 1.0


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B, T, rotary dim)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) tables (B, T, Dh_rot) for given position ids."""

    def __init__(self, *, rope: RopeArgs, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_pos = rope, head_dim, max_position_embeddings
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.scale = 1.0
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute ``inv_freq``; called again after meta-device materialisation."""
        device = self.inv_freq.device if self.inv_freq.device.type != "meta" else None
        inv, self.scale = rope_inv_freq(self.rope, self.head_dim, self.max_pos)
        self.inv_freq = inv.to(device) if device is not None else inv

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, Dh) with tables (B, T, Dh_rot); dims past Dh_rot pass through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + rotate_half(head) * sin, tail), dim=-1)


class SwiGLU(nn.Module):
    """Gated FFN ``down(act(gate(x)) * up(x))`` with HF projection names."""

    def __init__(self, *, dim: int, hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
