"""Data-parallel training on CPU with gloo: 2 ranks (torchrun) == 1 process with the global batch.

Dropout is 0 where runs are compared across rank counts: each rank draws its own masks (see
moetune/train/distributed.py), so with dropout > 0 only runs on the same rank count reproduce each
other - tested too, with a 2-rank save and a 2-rank resume.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from moetune.config import load_train_config
from moetune.demo_data import make_rows, write_jsonl
from moetune.errors import ConfigError
from moetune.model.moe import RouterStats
from moetune.train.checkpoint import load_checkpoint
from moetune.train.distributed import DataParallel, LaunchEnv, launch_env, rank_seed
from moetune.train.distributed import resolve_launch as _resolve
from moetune.tiny_models import make_tiny
from moetune.train.trainer import train
from quant_fixtures import write_fp8_folder
from train_helpers import write_run

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
    ),
    pytest.mark.usefixtures("one_thread"),  # in-process runs on one thread, like the torchrun ranks
]
TOL = 1e-5
STEPS = 4


def _config(
    root: Path,
    *,
    batch_size: int,
    dropout: float = 0.0,
    grad_accum: int = 2,
    targets=("q_proj", "v_proj", "experts"),
    **sections,
) -> Path:
    """A tiny MoE LoRA run with the aux loss on, clipping, grad accumulation and an eval set of 9
    rows (uneven over 2 ranks, so FSDP evaluation needs a filler forward on rank 1)."""
    cfg = write_run(
        root,
        **sections,
        adapter={"r": 4, "alpha": 8, "dropout": dropout, "target_modules": list(targets)},
        optim={
            "lr": 3e-3,
            "max_steps": STEPS,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "warmup_steps": 1,
            "aux_loss_coef": 0.01,
        },
        checkpoint={"output_dir": str(root / "run"), "save_every": 1, "keep_last": STEPS},
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["eval"] = str(write_jsonl(make_rows("upper", 9, 2), root / "val9.jsonl"))
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _torchrun(cfg: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that dies prints every thread's Python stack into the failure
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "moetune",
        "-v",
        "train",
        str(cfg),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("trained ") == 1, proc.stdout  # rank 0 alone prints the summary
    return proc


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def _series(run: Path, key: str) -> list[float]:
    return [r[key] for r in _records(run) if r.get(key) is not None]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(a: Path, b: Path, tol: float = TOL) -> dict[str, float]:
    """Max |difference| of each metric series and of the adapter tensors, each within ``tol``."""
    diffs = {}
    for key in ("loss", "aux_loss", "grad_norm", "eval_loss"):
        xa, xb = _series(a, key), _series(b, key)
        assert len(xa) == len(xb) > 0, (key, xa, xb)
        diffs[key] = max(abs(x - y) for x, y in zip(xa, xb))
    assert _series(a, "tokens") == _series(b, "tokens")
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    diffs["adapter"] = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert max(diffs.values()) <= tol, diffs
    return diffs


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, batch 8 (= 2 ranks x 4)."""
    root = tmp_path_factory.mktemp("single")
    train(load_train_config(_config(root, batch_size=8)))
    return root / "run"


@pytest.fixture(scope="module", params=["replicate", "fsdp"])
def two_ranks(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(request.param)
    _torchrun(_config(root, batch_size=4), f"distributed.strategy={request.param}")
    return request.param, root


def test_two_ranks_equal_one_process_with_the_global_batch(single, two_ranks):
    strategy, root = two_ranks
    _assert_same_run(single, root / "run")
    ckpt = load_checkpoint(root / "run" / "checkpoints" / "checkpoint-00000002")
    assert ckpt.extra["world_size"] == 2 and ckpt.extra["global_batch"] == 8 and len(ckpt.rng["ranks"]) == 2
    full = load_checkpoint(single / "checkpoints" / "checkpoint-00000002")
    for key, t in full.adapters["default"].items():  # full tensors, not one rank's shard
        assert ckpt.adapters["default"][key].shape == t.shape, (strategy, key)
    state = ckpt.optimizers["default"]["state"]
    assert all(type(v) is torch.Tensor for s in state.values() for v in s.values())


def test_save_at_two_ranks_resume_at_one(two_ranks, tmp_path):
    strategy, root = two_ranks
    resumed = tmp_path / "resumed"
    shutil.copytree(root, resumed)
    raw = yaml.safe_load((resumed / "run.yaml").read_text())
    raw["optim"]["batch_size"] = 8  # same global batch on one rank
    raw["checkpoint"]["output_dir"] = str(resumed / "run")
    (resumed / "run.yaml").write_text(yaml.safe_dump(raw))
    for late in ("checkpoint-00000003", "checkpoint-00000004"):
        shutil.rmtree(resumed / "run" / "checkpoints" / late)
    result = train(load_train_config(resumed / "run.yaml"), resume=True)
    assert result.steps == STEPS
    assert [r["step"] for r in _records(resumed / "run") if "loss" in r] == list(range(1, STEPS + 1))
    _assert_same_run(root / "run", resumed / "run")


def test_dropout_runs_resume_exactly_on_the_same_rank_count(tmp_path):
    """Every rank's RNG state is in the checkpoint: kill-free save at step 2, resume at 2 ranks."""
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(_config(a, batch_size=4, dropout=0.1, grad_accum=1))
    shutil.copytree(a, b)
    raw = yaml.safe_load((b / "run.yaml").read_text())
    raw["checkpoint"]["output_dir"] = str(b / "run")
    (b / "run.yaml").write_text(yaml.safe_dump(raw))
    _torchrun(b / "run.yaml", "--resume", str(b / "run" / "checkpoints" / "checkpoint-00000002"))
    _assert_same_run(a / "run", b / "run", tol=0.0)


def test_fsdp_shards_an_fp8_base_and_trains_as_one_process(tmp_path):
    """DeepSeek-V3 as released in FP8 (block-scaled e4m3 + fp32 scales) under FSDP on 2 ranks: each
    rank holds half of the stored bytes, all-gathered per layer for its forward and backward, and the
    run equals one process with the global batch."""
    fp8 = tmp_path / "fp8"
    write_fp8_folder(make_tiny("deepseek_v3", tmp_path / "tiny"), fp8, block=(16, 16))
    model = {"path": str(fp8), "device": "cpu"}
    targets = ("q_b_proj", "kv_b_proj", "o_proj", "experts", "shared_experts")
    train(load_train_config(_config(tmp_path / "one", batch_size=8, targets=targets, model=model)))
    proc = _torchrun(_config(tmp_path / "two", batch_size=4, targets=targets, model=model), "distributed.strategy=fsdp")
    logged = r"rank (\d)/2 holds (\d+) of (\d+) bytes of the base's fp8 weights \(loaded its own rows\)"
    held = re.findall(logged, proc.stderr)
    assert sorted(r for r, _, _ in held) == ["0", "1"], proc.stderr[-3000:]
    whole = int(held[0][2])
    assert {int(w) for _, _, w in held} == {whole} and sum(int(h) for _, h, _ in held) == whole
    assert all(abs(int(h) - whole / 2) <= 0.01 * whole for _, h, _ in held)
    diffs = _assert_same_run(tmp_path / "one" / "run", tmp_path / "two" / "run")
    print(f"fp8 base, fsdp on 2 ranks: {[int(h) for _, h, _ in held]} of {whole} stored bytes; vs 1 process {diffs}")


def test_launch_env_and_resolution():
    assert launch_env({}) is None
    assert launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == LaunchEnv(
        rank=1, world_size=2, local_rank=1
    )
    with pytest.raises(ConfigError, match="LOCAL_RANK missing"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="RANK"):
        launch_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert len({rank_seed(0, r) for r in range(8)}) == 8 and rank_seed(0, 1) != rank_seed(1, 1)


def test_resolve_strategy_and_backend(tmp_path):
    cfg = write_run(tmp_path)
    env = LaunchEnv(rank=0, world_size=2, local_rank=0)
    device, backend, strategy = _resolve(load_train_config(cfg), env)
    assert (device.type, backend, strategy) == ("cpu", "gloo", "replicate")  # auto on CPU
    assert _resolve(load_train_config(cfg, ["distributed.strategy=fsdp"]), env)[2] == "fsdp"
    assert _resolve(load_train_config(cfg, ["distributed.strategy=fsdp", "model.quantize=nf4"]), env)[2] == "fsdp"
    with pytest.raises(ConfigError, match="nccl"):
        _resolve(load_train_config(cfg, ["distributed.backend=nccl"]), env)
    with pytest.raises(ConfigError, match="did you mean 'strategy'"):
        load_train_config(cfg, ["distributed.stratgy=fsdp"])


def _router_stats(rank: int) -> RouterStats:
    """One token per rank, routed to expert 0 twice; the aux loss counts other choices (MiniMax-M2)."""
    aux_counts = torch.tensor([0.0, 2.0 * (rank + 1)])
    return RouterStats(
        counts=torch.tensor([2.0, 0.0]), prob_sum=torch.full((2,), 0.5), tokens=torch.tensor(1.0), aux_counts=aux_counts
    )


def _collectives(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    par = DataParallel(
        LaunchEnv(rank=rank, world_size=world, local_rank=rank),
        strategy="replicate",
        device=torch.device("cpu"),
        seed=0,
    )
    labels = torch.full((1, 6), -100)
    labels[0, : 2 + 3 * rank] = 7  # rank 0 counts 1 token, rank 1 counts 4
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 2, 1))
    a.grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        b.grad = torch.ones(2)  # only rank 1 has a gradient for b: the sum is not None
    par.sync_grads([a, b, c])
    result = {
        "ok": [par.all_ok(rank == 0), par.all_ok(True)],
        "weights": par.micro_weights([{"labels": labels, "attention_mask": torch.ones_like(labels)}]),
        "grads": [a.grad.tolist(), b.grad.tolist(), c.grad],
        "sums": par.sum_floats(1.5, rank),
        "aux": float(par.aux_loss(SimpleNamespace(router_stats=[_router_stats(rank)], aux_loss=None), 2)),
    }
    torch.save(result, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_collectives_agree_across_ranks(tmp_path):
    mp.spawn(_collectives, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank, weight in ((0, 0.2), (1, 0.8)):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert r["ok"] == [False, True]  # one rank's non-finite step is skipped by all
        assert r["weights"] == pytest.approx([weight])  # share of the global batch's counted tokens
        assert r["grads"] == [[3.0] * 3, [1.0] * 2, None]
        assert r["sums"] == [3.0, 1.0]
        # E * sum_e (aux counts [0, 6] / 2 tokens) * (local probs 0.5 / 2 tokens): the loss's counts, reduced
        assert r["aux"] == pytest.approx(1.5)
