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
that straddle a piece's ends are held in full precision until the weight is complete
(:mod:`.nf4_pieces`). CPU temporaries live in reused per-thread buffers (:mod:`.scratch`).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from .rounding import LevelTable
from .scratch import buffer

BLOCK = 64
SCALE_BLOCK = 256
# Elements quantized at once, so the working memory (~17 bytes per element of a chunk) is bounded
# whatever the weight's size. On CPU each chunk is one worker's task on one thread: 2^19 keeps two
# workers' temporaries in a 32 MB L3 (one thread: 2.8 ns an element at 2^19, 3.5 at 2^21) and is
# few enough calls that their hand-overs of the GIL stay small. On a GPU, enough to fill it.
CHUNK = {"cpu": 1 << 19}
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
    return _rounding(kind)(scaled)


def _rounding(kind: str) -> LevelTable:
    if kind not in _ROUNDING:
        _ROUNDING[kind] = LevelTable(_table(kind + "_bounds", torch.device("cpu")))
    return _ROUNDING[kind]


def _quantize_whole_blocks(x: torch.Tensor, block: int, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """x (m,) bf16, fp16 or fp32, m a multiple of ``block`` (even) -> ``codes`` (m/2,) and ``absmax``
    (m/block,) written in place. |x| is x's bits without the sign bit, whose integer order is the
    order of the magnitudes (NaN above inf, so NaN still wins the max): exact, and cheaper than
    abs() on floats. The product with the fp32 reciprocal widens x exactly. The clamp to [-1, 1]
    of the reference is left out: scaled values exceed 1 in magnitude only by rounding, and code
    15 (or 0) is already theirs. Two codes a byte: odd element + 16 * even element."""
    v, m = x.view(-1, block), x.numel()
    int_type, magnitude = _SAME_SIZE_INT[x.element_size()]
    bits = torch.bitwise_and(v.view(int_type), magnitude, out=buffer("nf4_magnitude", m, int_type, x.device).view_as(v))
    absmax.copy_(bits.amax(dim=1).view(x.dtype))
    scaled = buffer("nf4_scaled", m, torch.float32, x.device).view(-1, block)
    scaled.copy_(v).mul_((1.0 / absmax.clamp(min=1e-38))[:, None])  # widened in place: no temporary copy of x
    _pack_pairs(_rounding("nf4")(scaled.view(-1), out=buffer("nf4_codes", m, torch.uint8, x.device)), codes)


def _pack_pairs(q: torch.Tensor, codes: torch.Tensor) -> None:
    """codes[i] = 16 * q[2i] + q[2i+1], for q (2k,) uint8 codes < 16. On a little-endian machine a
    pair read as one int16 w is q[2i] + 256 q[2i+1], so the byte is the low byte of (w << 4) + (w >> 8):
    four passes over k int16 values, cheaper than one over the 2k bytes read with a stride of 2."""
    if sys.byteorder != "little":
        torch.add(q[1::2], q[0::2], alpha=16, out=codes)
        return
    w = q.view(torch.int16)
    high = torch.bitwise_left_shift(w, 4, out=buffer("nf4_pack", w.numel(), torch.int16, q.device))
    high.add_(torch.bitwise_right_shift(w, 8, out=buffer("nf4_pack_low", w.numel(), torch.int16, q.device)))
    codes.copy_(high.bitwise_and_(0xFF))  # masked first: a narrowing copy may saturate instead of wrapping


def quantize_blocks(
    x: torch.Tensor, block: int = BLOCK, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First level: x (n,) float -> codes (ceil(n/2),) uint8 packed, absmax (ceil(n/block),) fp32,
    written into ``out`` when given.

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
    if out is None:
        out = (
            torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=x.device),
            torch.empty(math.ceil(n / block), dtype=torch.float32, device=x.device),
        )
    codes, absmax = out
    step = chunk_elements(x.device, block)
    for start in range(0, full, step):
        end = min(start + step, full)
        _quantize_whole_blocks(x[start:end], block, codes[start // 2 : end // 2], absmax[start // block : end // block])
    if full < n:
        tail = x[full:].float()
        absmax[-1] = tail.abs().amax().clamp(min=1e-38)
        q = nearest_codes(F.pad(torch.clamp(tail / absmax[-1], -1, 1), (0, (n - full) % 2)))  # pad: code 7 (0.0)
        codes[full // 2 :] = (q[0::2] << 4) | q[1::2]
    return codes, absmax


def chunk_elements(device: torch.device, block: int) -> int:
    """Elements quantized at once on ``device``: whole blocks, about :data:`CHUNK`."""
    return max(1, CHUNK.get(device.type, CHUNK_OTHER) // block) * block


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
