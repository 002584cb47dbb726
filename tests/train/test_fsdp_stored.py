"""FSDP2 on a base held in a stored format (FP8, INT4, MXFP4 as released; NF4 quantized on load):
2 CPU ranks with gloo, each loading only the rows it keeps of what is read as stored, each hold
about half of the stored bytes, stay sharded after a forward and backward, and give the LoRA
gradients of one process on the whole batch.

The end-to-end ``moetune train`` run on an FP8 base under torchrun is in test_distributed.py.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moetune
from moetune.config import load_train_config
from moetune.model.quant import StoredWeight
from moetune.model.quant.stored import fsdp_rows
from moetune.tiny_models import make_tiny
from moetune.train.setup import prepare_run
from moetune.train.sharding import is_dtensor, shard_model, stored_bytes_held
from train_helpers import write_run

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
    ),
    pytest.mark.usefixtures("one_thread"),  # the one-process reference on one thread, like the ranks
]
MLA = ["q_b_proj", "kv_b_proj", "o_proj", "experts", "shared_experts"]
# format -> (folder, quantize, targets)
CASES = {
    "fp8": ("fp8", None, MLA),
    "int4": ("int4", None, MLA),
    "mxfp4": ("mxfp4", None, ["q_proj", "o_proj", "experts"]),
    "nf4": ("deepseek/base-model", "nf4", MLA),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    pytest.importorskip("compressed_tensors")
    # imported here, so the spawned ranks, which import this module, do not load transformers' code
    from quant_fixtures import KIMI_IGNORE, write_fp8_folder, write_int4_folder, write_mxfp4_folder

    root = tmp_path_factory.mktemp("stored")
    deepseek = make_tiny("deepseek_v3", root / "deepseek", train_rows=1, eval_rows=1)
    write_fp8_folder(deepseek, root / "fp8", block=(16, 16))
    write_int4_folder(deepseek, root / "int4", ignore=KIMI_IGNORE)  # Kimi-K2-Thinking: experts in int4
    write_mxfp4_folder(make_tiny("gpt_oss", root / "gpt_oss", train_rows=1, eval_rows=1), root / "mxfp4")
    return root


def _model(root: Path, fmt: str, shard: tuple[int, int] | None = None):
    folder, quantize, targets = CASES[fmt]
    model = moetune.load_model(root / folder, quantize=quantize, shard=shard)
    moetune.add_adapter(model, moetune.LoraConfig(r=4, alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would leave A without a gradient
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(1))


def _ranks(rank: int, world: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    result = {}
    for fmt in CASES:
        model = _model(Path(root), fmt, shard=(rank, world))  # this rank's rows only, of what is read as stored
        holders = [m for m in model.modules() if isinstance(m, StoredWeight)]
        shard_model(model, device=torch.device("cpu"), world_size=world)
        held = stored_bytes_held(holders)
        rows = _ids()[rank::world]
        (model(rows, labels=rows).loss / world).backward()  # equal token counts: the mean over ranks
        sharded = all(is_dtensor(t) for h in holders for t in h.stored_tensors() if t.ndim > 0)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        result[fmt] = {"held": held, "after": stored_bytes_held(holders), "sharded": sharded, "grads": grads}
    torch.save(result, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_stored_bases_shard_in_halves_and_give_one_process_gradients(folders, tmp_path):
    mp.spawn(_ranks, args=(2, str(folders), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for fmt in CASES:
        model = _model(folders, fmt)
        ids = _ids()
        sum(model(ids[r::2], labels=ids[r::2]).loss / 2 for r in range(2)).backward()
        expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        (held0, whole), (held1, _) = ranks[0][fmt]["held"], ranks[1][fmt]["held"]
        err = max((expected[n] - ranks[0][fmt]["grads"][n]).abs().max().item() for n in expected)
        print(f"{fmt}: ranks hold {held0} + {held1} of {whole} stored bytes; max |dgrad| vs 1 process {err:.1e}")
        assert all(r[fmt]["sharded"] and r[fmt]["after"] == r[fmt]["held"] for r in ranks)
        assert max(held0, held1) <= 0.51 * whole and held0 + held1 <= 1.01 * whole
        assert ranks[0][fmt]["grads"].keys() == expected.keys() and len(expected) > 0
        assert err <= 1e-6


def test_a_rank_loads_its_own_rows_and_dequantizes_only_once_sharded(folders):
    whole = moetune.load_model(folders / "fp8")
    for rank in range(2):
        part = moetune.load_model(folders / "fp8", shard=(rank, 2))
        holders = [(p, h) for p, h in part.named_modules() if isinstance(h, StoredWeight)]
        assert len(holders) > 0
        for path, holder in holders:
            for key, t in holder.named_buffers():
                start, end = fsdp_rows(t.shape[0], rank, 2)
                expected = whole.get_submodule(path).get_buffer(key)[start:end]
                assert torch.equal(t[start:end].view(torch.uint8), expected.view(torch.uint8)), (path, key)
        kv_b = part.get_submodule("model.layers.0.self_attn.kv_b_proj")
        with pytest.raises(RuntimeError, match=f"holds only rank {rank}'s rows of 2 until the model is sharded"):
            kv_b(torch.zeros(1, kv_b.in_features))


@pytest.mark.parametrize("dora", [False, True])
def test_a_run_loads_its_rows_unless_an_adapter_reads_the_base_when_made(folders, tmp_path, dora):
    """DoRA's magnitude is the norm of the base weight's rows, all of them: that run loads whole."""
    adapter = {"r": 4, "alpha": 8, "target_modules": ["q_b_proj", "kv_b_proj"], "method": "dora" if dora else "lora"}
    cfg = write_run(tmp_path, model={"path": str(folders / "fp8"), "device": "cpu"}, adapter=adapter)
    parts = prepare_run(load_train_config(cfg), shard=(1, 2))
    shards = {h.shard for h in parts.model.modules() if isinstance(h, StoredWeight)}
    assert shards == ({None} if dora else {(1, 2)})
