"""NF4 rounding by table (nf4.nearest_codes) equals ``torch.bucketize`` against the midpoints, and the
chunked quantizer equals the unchunked bucketize quantizer it replaced, byte for byte."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moetune.model.quant import nf4, nf4_pieces

CPU = torch.device("cpu")


def _bounds(kind: str) -> torch.Tensor:
    code = nf4.NF4_CODE if kind == "nf4" else nf4.DYNAMIC_CODE
    return (code[:-1] + code[1:]) / 2


def _bucketize_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous ``quantize_blocks`` (scale_blocks, then one bucketize over the whole weight),
    checked against bitsandbytes by ``test_codes_match_bitsandbytes``: what the chunked one must equal."""
    scaled, absmax = nf4.scale_blocks(x.reshape(-1).float(), nf4.BLOCK)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, _bounds("nf4"), out_int32=True).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def _bucketize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The previous ``quantize_scales``."""
    offset = absmax.mean()
    scaled, scale = nf4.scale_blocks(absmax - offset, nf4.SCALE_BLOCK)
    return torch.bucketize(scaled, _bounds("dyn"), out_int32=True).to(torch.uint8), scale, offset


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _bits(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).int().view(torch.float32)


@pytest.mark.parametrize("kind", ["nf4", "dyn"])
def test_table_rounding_equals_bucketize(kind):
    bounds = _bounds(kind)
    g = torch.Generator().manual_seed(0)
    ends = torch.arange(65536, dtype=torch.int64) << 16
    near_mids = (bounds.view(torch.int32).long()[:, None] + torch.arange(-300, 301)).reshape(-1)
    patterns = torch.cat(
        [ends, ends | 0xFFFF, ends | 0x8000, near_mids, torch.randint(0, 2**32, (1 << 20,), generator=g)]
    )
    values = _bits(torch.where(patterns >= 2**31, patterns - 2**32, patterns))
    values = torch.where(values.isinf(), math.nan, values)  # never produced by scaling; NaN is
    values = torch.cat([values, torch.linspace(-1.001, 1.001, 200_001), bounds, torch.tensor([0.0, -0.0])])
    expected = torch.bucketize(values, bounds).to(torch.uint8)
    assert torch.equal(nf4.nearest_codes(values, kind), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 63, 64, 1001, 2 * nf4.CHUNK["cpu"] + 64 * 5 + 37])
def test_chunked_quantizer_equals_bucketize_quantizer(n, dtype):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=g) * 0.02
    w[::97] *= 50  # outliers: blocks of very different absmax
    if n > 1000:
        w[64:128] = 0.0  # a zero block
        w[128:192] *= 1e-38  # subnormal magnitudes
        w[300] = math.nan  # a NaN block and an infinite one
        w[400] = -math.inf
        w[-1] = math.inf  # in the short last block
    w = w.to(dtype)
    codes, absmax = nf4.quantize_blocks(w)
    ref_codes, ref_absmax = _bucketize_quantize(w)
    assert torch.equal(codes, ref_codes)
    assert _same(absmax, ref_absmax)
    finite = ref_absmax[ref_absmax.isfinite()]  # an infinite or NaN scale would spoil every mean
    assert all(map(_same, nf4.quantize_scales(finite), _bucketize_scales(finite)))


def test_bf16_pieces_quantize_as_their_fp32_values():
    # The holder now widens pieces to fp32 after moving them, chunk by chunk: same codes.
    w = (torch.randn(3 * 1000 + 7, generator=torch.Generator().manual_seed(3)) * 0.02).bfloat16()
    q = nf4_pieces.BlockQuantizer(w.numel(), CPU)
    for start, end in [(1500, 3007), (0, 999), (999, 1500)]:
        q.write(start, w[start:end])
    codes, absmax_codes, scale, offset = q.result()
    ref_codes, ref_absmax = _bucketize_quantize(w)
    assert torch.equal(codes, ref_codes)
    assert all(map(torch.equal, (absmax_codes, scale, offset), _bucketize_scales(ref_absmax)))


def test_table_rounding_takes_fp32_only_and_any_layout():
    values = torch.linspace(-1, 1, 101)
    expected = torch.bucketize(values[::2].contiguous(), _bounds("nf4")).to(torch.uint8)
    assert torch.equal(nf4.nearest_codes(values[::2]), expected)
    with pytest.raises(TypeError, match="rounds fp32 values"):
        nf4.nearest_codes(values.bfloat16())


def test_odd_block_size_is_refused():
    with pytest.raises(ValueError, match="block size must be even"):
        nf4.quantize_blocks(torch.randn(10), block=5)


@pytest.fixture
def two_threads():
    """Two intra-op threads, so CPU pieces go to the quantizer's workers (the suite may run with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pieces_quantized_by_cpu_workers_equal_bucketize(two_threads):
    n = 3 * nf4.CHUNK["cpu"] + 64 * 7 + 33  # several chunks a piece, and a short last block
    w = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.02).bfloat16()
    cuts = [0, 100, 64 * 9000, nf4.CHUNK["cpu"] * 2 + 5, n - 40, n]  # edges inside blocks, a piece over 2 chunks
    q = nf4_pieces.BlockQuantizer(n, CPU)
    for start, end in reversed(list(zip(cuts[:-1], cuts[1:]))):
        q.write(start, w[start:end])
    codes, absmax_codes, scale, offset = q.result()
    ref_codes, ref_absmax = _bucketize_quantize(w)
    assert torch.equal(codes, ref_codes)
    assert all(map(torch.equal, (absmax_codes, scale, offset), _bucketize_scales(ref_absmax)))


def test_cpu_workers_leave_the_thread_count_alone(two_threads):
    from moetune.model.quant import cpu_workers

    cpu_workers.shutdown()  # the pool is made anew below, by this thread's call
    assert cpu_workers.submit(lambda: torch.get_num_threads()).result() == 1  # a worker runs one-threaded
    seen = []
    thread = __import__("threading").Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == 2 and seen == [2]  # here, and in threads started later


def test_a_workers_error_is_raised_by_result(two_threads, monkeypatch):
    def fail(*args):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(nf4, "_quantize_whole_blocks", fail)
    q = nf4_pieces.BlockQuantizer(64 * 10, CPU)
    q.write(0, torch.randn(64 * 10))
    with pytest.raises(RuntimeError, match="worker failed"):
        q.result()


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_code_pairs_pack_high_nibble_first(byteorder, monkeypatch):
    if byteorder != __import__("sys").byteorder:
        monkeypatch.setattr(nf4.sys, "byteorder", byteorder)  # the other branch: the strided form
    q = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1).to(torch.uint8)
    codes = torch.empty(256, dtype=torch.uint8)
    nf4._pack_pairs(q, codes)
    assert torch.equal(codes, torch.arange(256, dtype=torch.uint8))
