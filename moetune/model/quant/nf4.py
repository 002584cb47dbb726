"""The NF4 storage format of QLoRA, byte for byte as bitsandbytes writes it, in plain PyTorch.

Legend: n elements of a weight (flattened row-major), bs = 64 elements per block, nb = ceil(n/bs)
blocks, bs2 = 256 block scales per second-level block, nb2 = ceil(nb/bs2).

A weight is stored as:
- ``codes`` (ceil(n/2),) uint8: element i's 4-bit index into :data:`NF4_CODE`, two per byte, the
  even element in the high nibble (bitsandbytes' packing);
- first-level scale ``absmax`` (nb,) = max |w| of each block; a code times its block's absmax is the
  dequantized value. With double quantization (QLoRA section 3) the absmax values are themselves
  stored as ``absmax_codes`` (nb,) uint8 indices into the signed 8-bit dynamic map
  (:func:`dynamic_map`) after subtracting their mean ``absmax_offset`` () fp32, with one fp32
  ``absmax_scale`` per 256 of them (nb2,).

That is 0.5 + 1/64 + 4/(64*256) ~= 0.516 bytes per element. Quantization rounds to the nearest code
(the number of midpoints strictly below the value: ties go to the lower code) exactly as bitsandbytes'
reference kernel does, so codes can be compared with it (tests/model/test_quant.py does when it is
installed), by table lookup rather than ``bucketize`` (:mod:`.rounding`: same codes, several times
faster), in chunks of whole blocks, on the weight's device.

Writing a weight in pieces (:class:`BlockQuantizer`) lets the loader quantize each checkpoint
tensor as soon as it is read, whatever slice of the native weight it fills (one expert, the gate
half of one expert): only the block scales of the weight being filled and at most the two blocks
that straddle a piece's ends are held in full precision until the weight is complete.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rounding import LevelTable

BLOCK = 64
SCALE_BLOCK = 256
# Elements quantized at once, so the working memory (~17 bytes per element of a chunk) is bounded
# whatever the weight's size. On CPU a chunk's ~12 elementwise passes cost a fixed dispatch each:
# 2^20 quantized a 48M-element bf16 tensor at 2.8-3.8 ns an element on 2 idle cores, 2^18 at 5.0-5.4
# and 2^22 at 7.7-8.6 (no longer in cache). On a GPU, enough to fill it.
CHUNK = {"cpu": 1 << 20}
CHUNK_OTHER = 1 << 24

# The 16 NormalFloat levels of QLoRA (Dettmers et al. 2023, appendix E), as bitsandbytes holds them.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic-tree map (256 sorted values in [-1, 1]) bitsandbytes uses for
    block scales; the same construction as its ``create_dynamic_map(signed=True)``."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional > 0:  # never for 8 bits / 7 exponent bits; kept so the construction reads as the original
        bounds = torch.linspace(0.1, 1, additional + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Cached per device: code tables, their rounding midpoints, and the byte -> 2 values table."""
    key = (kind, device)
    if key not in _TABLES:
        code = NF4_CODE if kind.startswith("nf4") else DYNAMIC_CODE  # "dyn..."
        if kind.endswith("bounds"):
            t = (code[:-1] + code[1:]) / 2
        elif kind == "nf4_pairs":  # byte b -> (code[b >> 4], code[b & 15]): one gather per byte
            b = torch.arange(256)
            t = torch.stack([code[b >> 4], code[b & 15]], dim=1)
        else:
            t = code
        _TABLES[key] = t.to(device)
    return _TABLES[key]


def scale_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) fp32 -> values scaled into [-1, 1] per block (n,) and the block absmax (ceil(n/block),).

    Full blocks are multiplied by the reciprocal, a short last block divided: the reference
    kernel's arithmetic, so the rounded codes agree with it to the bit. The block scales are
    scaled here; :func:`quantize_blocks` does the same arithmetic in chunks (tests compare them).
    """
    n = x.numel()
    full = n - n % block
    absmax = x[:full].view(-1, block).abs().amax(dim=1)
    scaled = torch.clamp(x[:full].view(-1, block) * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).view(-1)
    if full < n:
        tail_max = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / tail_max, -1, 1)])
    return scaled, absmax


_SAME_SIZE_INT = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}  # element size -> (int, all but sign)
_ROUNDING: dict[str, LevelTable] = {}


def nearest_codes(scaled: torch.Tensor, kind: str = "nf4") -> torch.Tensor:
    """(m,) fp32 values (scaled into [-1, 1], or NaN) -> (m,) uint8 index of the nearest level of
    the map ``kind`` ("nf4": :data:`NF4_CODE`, "dyn": :data:`DYNAMIC_CODE`), ties to the lower one:
    ``torch.bucketize(scaled, midpoints)`` to the bit, by table (:class:`.rounding.LevelTable`)."""
    if kind not in _ROUNDING:
        _ROUNDING[kind] = LevelTable(_table(kind + "_bounds", torch.device("cpu")))
    return _ROUNDING[kind](scaled)


def _quantize_whole_blocks(x: torch.Tensor, block: int, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """x (m,) bf16, fp16 or fp32, m a multiple of ``block`` (even) -> ``codes`` (m/2,) and ``absmax``
    (m/block,) written in place. |x| is x's bits without the sign bit, whose integer order is the
    order of the magnitudes (NaN above inf, so NaN still wins the max): exact, and cheaper than
    abs() on floats. The product with the fp32 reciprocal widens x exactly. The clamp to [-1, 1]
    of the reference is left out: scaled values exceed 1 in magnitude only by rounding, and code
    15 (or 0) is already theirs. Two codes a byte: odd element + 16 * even element."""
    v = x.view(-1, block)
    int_type, magnitude = _SAME_SIZE_INT[x.element_size()]
    absmax.copy_(v.view(int_type).bitwise_and(magnitude).amax(dim=1).view(x.dtype))
    q = nearest_codes((v * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1))
    torch.add(q[1::2], q[0::2], alpha=16, out=codes)


def quantize_blocks(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """First level: x (n,) float -> codes (ceil(n/2),) uint8 packed, absmax (ceil(n/block),) fp32.

    Whole blocks go in chunks of :data:`CHUNK` elements; the short last block is divided, not
    multiplied by the reciprocal, as the reference kernel does.
    """
    if block % 2:
        raise ValueError(f"NF4 block size must be even (two codes a byte), got {block}")
    x = x.reshape(-1)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        x = x.float()  # rounded once, as the reference does, before any arithmetic
    n = x.numel()
    full = n - n % block
    codes = torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(math.ceil(n / block), dtype=torch.float32, device=x.device)
    step = max(1, CHUNK.get(x.device.type, CHUNK_OTHER) // block) * block
    for start in range(0, full, step):
        end = min(start + step, full)
        _quantize_whole_blocks(x[start:end], block, codes[start // 2 : end // 2], absmax[start // block : end // block])
    if full < n:
        tail = x[full:].float()
        absmax[-1] = tail.abs().amax().clamp(min=1e-38)
        q = nearest_codes(F.pad(torch.clamp(tail / absmax[-1], -1, 1), (0, (n - full) % 2)))  # pad: code 7 (0.0)
        codes[full // 2 :] = (q[0::2] << 4) | q[1::2]
    return codes, absmax


def quantize_scales(absmax: torch.Tensor, block: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level (double quantization): absmax (nb,) fp32 -> codes (nb,) uint8, scale (nb2,)
    fp32, offset () fp32. Centring on the mean first uses the signed map's full range."""
    offset = absmax.mean()
    scaled, scale = scale_blocks(absmax - offset, block)
    return nearest_codes(scaled, "dyn"), scale, offset


def dequantize_scales(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, block: int = SCALE_BLOCK
) -> torch.Tensor:
    """Inverse of :func:`quantize_scales`: (nb,) fp32 block absmax."""
    values = _table("dyn", codes.device).index_select(0, codes.int())
    nb = codes.numel()
    padded = F.pad(values, (0, scale.numel() * block - nb)).view(-1, block)
    return (padded * scale[:, None]).view(-1)[:nb] + offset


def dequantize_blocks(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    dtype: torch.dtype,
    block: int = BLOCK,
    chunk_blocks: int = 1 << 19,
) -> torch.Tensor:
    """First level inverse: codes (ceil(n/2),) uint8, absmax (nb,) fp32 -> (n,) in ``dtype``.

    Products are formed in fp32 and rounded once to ``dtype`` (as the reference kernel does), in
    chunks of ``chunk_blocks`` blocks so the fp32 temporaries stay small next to the result.
    """
    out = torch.empty(n, dtype=dtype, device=codes.device)
    pairs = _table("nf4_pairs", codes.device)
    step = chunk_blocks * block
    for start in range(0, n, step):
        end = min(start + step, n)
        values = pairs.index_select(0, codes[start // 2 : (end + 1) // 2].int()).view(-1)
        b0, b1 = start // block, math.ceil(end / block)
        values = F.pad(values, (0, (b1 - b0) * block - values.numel())).view(-1, block)
        out[start:end] = (values * absmax[b0:b1, None]).view(-1)[: end - start]
    return out


class BlockQuantizer:
    """Quantizes a weight of n elements that arrives in contiguous pieces, in any order.

    Blocks a piece covers whole are quantized at once; the part of a block at a piece's edge waits
    in a small fp32 buffer until the rest of that block arrives. :meth:`write` returns True once
    every block is done; :meth:`result` then gives the double-quantized state.
    """

    def __init__(self, n: int, device: torch.device, block: int = BLOCK) -> None:
        self.n, self.block = n, block
        self.nb = math.ceil(n / block)
        self.codes = torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=device)
        self.absmax = torch.zeros(self.nb, dtype=torch.float32, device=device)
        self.done = torch.zeros(self.nb, dtype=torch.bool)
        self.remaining = self.nb  # a counter, not done.all(): a 128-expert weight arrives in 384 pieces
        self.partial: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (values, filled mask)

    def _block_end(self, b: int) -> int:
        return min((b + 1) * self.block, self.n)

    def write(self, start: int, values: torch.Tensor) -> bool:
        """Put ``values`` (any shape, numel m) at flat positions [start, start+m)."""
        x = values.reshape(-1).to(device=self.codes.device)  # moved first, widened to fp32 in chunks there
        end = start + x.numel()
        if start < 0 or end > self.n:
            raise ValueError(f"piece [{start}, {end}) lies outside a weight of {self.n} elements")
        if end == start:
            return self.remaining == 0
        first, last = start // self.block, (end - 1) // self.block  # blocks the piece touches
        lo = first if first * self.block >= start else first + 1  # those it covers whole: [lo, hi)
        hi = last + 1 if self._block_end(last) <= end else last
        if lo < hi:
            self._quantize(lo, hi, x[lo * self.block - start : self._block_end(hi - 1) - start])
        for b in {first, last} - set(range(lo, hi)):  # at most the two edge blocks
            s, e = max(start, b * self.block), min(end, self._block_end(b))
            self._add_partial(b, s, x[s - start : e - start])
        return self.remaining == 0

    def _quantize(self, lo: int, hi: int, x: torch.Tensor) -> None:
        codes, absmax = quantize_blocks(x, self.block)
        self.codes[lo * self.block // 2 : lo * self.block // 2 + codes.numel()] = codes
        self.absmax[lo:hi] = absmax
        self.remaining -= (hi - lo) - int(self.done[lo:hi].sum())  # a block written twice counts once
        self.done[lo:hi] = True

    def _add_partial(self, b: int, start: int, x: torch.Tensor) -> None:
        size = self._block_end(b) - b * self.block
        values, filled = self.partial.setdefault(
            b, (torch.zeros(size, device=x.device), torch.zeros(size, dtype=torch.bool))
        )
        offset = start - b * self.block
        values[offset : offset + x.numel()] = x
        filled[offset : offset + x.numel()] = True
        if bool(filled.all()):
            self._quantize(b, b + 1, values)
            del self.partial[b]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (ceil(n/2),) uint8, absmax codes (nb,) uint8, scale (nb2,) fp32, offset () fp32."""
        if self.remaining:
            raise ValueError(f"{self.remaining} of {self.nb} blocks were never written")
        return (self.codes, *quantize_scales(self.absmax))
