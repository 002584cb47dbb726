"""NF4 quantization at load: ``load_model(quantize="nf4")`` now and with an earlier revision's quantizer.

Writes a Qwen3-MoE checkpoint of random bf16 weights in the released layout (one tensor per expert
and projection, so the loader quantizes each expert's piece as it is read; ~380 MB by default), then
loads it in turns: bf16 (no quantization: the cost of reading), nf4 with the current quantizer, and
nf4 with ``moetune/model/quant/nf4.py`` as it was at ``--before`` (read with ``git show`` and swapped
in for the holders' ``BlockQuantizer``; default: the last revision that rounded with ``bucketize``).
The order rotates every round, so whatever else the machine does falls on all three. Prints one
JSON line per case (median, min, max seconds) and a summary: the speed-up of the nf4 load and of
its quantization alone (nf4 load minus bf16 load), after checking both quantizers wrote the same
bytes.

    python bench/nf4_load.py                       # ~380 MB checkpoint, 5 rounds
    python bench/nf4_load.py --tiny --rounds 1     # seconds
    python bench/nf4_load.py --layers 12 --rounds 3  # ~1.9 GB
    python bench/nf4_load.py --device cuda         # quantized on the GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 - after the OpenMP setting, which must precede torch
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import moetune  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_grid import grid_config  # noqa: E402 - the bench folder's own module
from moetune.model.quant import nf4_pieces, quantized_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the git checkout the earlier quantizer is read from
BUCKETIZE_REVISION = "3dd440bd150759b9b5f98e6d3608450c961135be"


def write_checkpoint(folder: Path, *, hidden: int, experts: int, moe_hidden: int, layers: int, vocab: int) -> int:
    """A Qwen3-MoE folder of random bf16 weights, experts one tensor each; returns its bytes."""
    from transformers import Qwen3MoeForCausalLM

    cfg = grid_config(experts, hidden, layers)
    cfg.moe_intermediate_size, cfg.vocab_size = moe_hidden, vocab
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3MoeForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            names = ("gate_proj", "up_proj") if key.endswith("gate_up_proj") else ("down_proj",)
            per = (shape[1] // len(names), shape[2])
            for e in range(shape[0]):
                for name in names:
                    tensors[key.rsplit(".", 1)[0] + f".{e}.{name}.weight"] = _random(per, g)
        else:
            tensors[key] = _random(shape, g)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _random(shape, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 0.02).bfloat16()


def module_at(revision: str) -> types.ModuleType:
    """moetune/model/quant/nf4.py as it was at ``revision``, as a stand-alone module."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:moetune/model/quant/nf4.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("nf4_before")
    exec(compile(source, f"nf4.py@{revision[:10]}", "exec"), module.__dict__)
    return module


def holder_interface(module: types.ModuleType) -> type:
    """``module``'s BlockQuantizer as today's holders call it: told where the codes go, which an
    earlier quantizer did not take, so they are copied there at the end, as its holder then did."""

    class Before(module.BlockQuantizer):
        def __init__(self, n: int, device: torch.device, block: int = module.BLOCK, codes=None) -> None:
            super().__init__(n, device, block)
            self.out = codes

        def result(self):
            codes, *rest = super().result()
            if self.out is not None:
                self.out.copy_(codes)
            return (codes, *rest)

    return Before


@contextlib.contextmanager
def quantizer(before: types.ModuleType | None):
    """The holders write through ``before``'s BlockQuantizer (None: the current one)."""
    current = nf4_pieces.BlockQuantizer
    nf4_pieces.BlockQuantizer = holder_interface(before) if before is not None else current
    try:
        yield
    finally:
        nf4_pieces.BlockQuantizer = current


def load(folder: Path, device: str, case: str, before: types.ModuleType) -> tuple[float, torch.nn.Module]:
    quantize = None if case == "bf16" else "nf4"
    with quantizer(before if case == "nf4-before" else None):
        t0 = time.perf_counter()
        model = moetune.load_model(folder, dtype=torch.bfloat16, device=device, quantize=quantize)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, model


def same_bytes(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    qa, qb = quantized_weights(a), quantized_weights(b)
    return qa.keys() == qb.keys() and all(
        all(torch.equal(x, y) for x, y in zip(qa[k].buffers(), qb[k].buffers())) for k in qa
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5, help="loads per case (median of these)")
    p.add_argument("--before", default=BUCKETIZE_REVISION, help="git revision of the quantizer to compare with")
    p.add_argument("--tiny", action="store_true", help="a ~10 MB checkpoint (smoke test)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers: ~160 MB each, plus 67 MB")
    p.add_argument("--folder", type=Path, help="write the checkpoint here (default: a temporary folder)")
    ns = p.parse_args(argv)
    size = dict(hidden=256, experts=8, moe_hidden=128, layers=2, vocab=4096) if ns.tiny else {}
    size = {**dict(hidden=1024, experts=64, moe_hidden=384, layers=ns.layers, vocab=16384), **size}
    before = module_at(ns.before)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ns.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        nbytes = write_checkpoint(folder, **size)
        cases = ["bf16", "nf4", "nf4-before"]
        _, now = load(folder, ns.device, "nf4", before)  # warm-up: file in the page cache, tables built
        _, then = load(folder, ns.device, "nf4-before", before)
        if not same_bytes(now, then):
            print(json.dumps({"error": "the two quantizers wrote different bytes"}))
            return 1
        del now, then
        times: dict[str, list[float]] = {c: [] for c in cases}
        for r in range(ns.rounds):
            for case in cases[r % 3 :] + cases[: r % 3]:
                times[case].append(load(folder, ns.device, case, before)[0])
    med = {c: statistics.median(v) for c, v in times.items()}
    for case, v in times.items():
        row = dict(case=case, median_s=round(med[case], 3), min_s=round(min(v), 3), max_s=round(max(v), 3))
        print(json.dumps(row | dict(checkpoint_mb=round(nbytes / 1e6, 1), device=ns.device)), flush=True)
    quant = {"before": med["nf4-before"] - med["bf16"], "now": med["nf4"] - med["bf16"]}
    summary = {
        "load_speedup": round(med["nf4-before"] / med["nf4"], 2),
        "quantization_s": {k: round(v, 3) for k, v in quant.items()},
        "quantization_speedup": round(quant["before"] / max(quant["now"], 1e-9), 2),
        "same_bytes": True,
        "rounds": ns.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
