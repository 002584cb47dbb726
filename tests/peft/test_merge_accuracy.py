"""Merging two task adapters keeps task accuracy above the base's (a seconds-sized version of
bench/merge_study.py: two token-mapping tasks on a tiny random Qwen3-MoE, LoRA on attention and
routed experts, each adapter trained just until it solves its task)."""

from __future__ import annotations

import pytest
import torch

import moetune
from moetune.peft.arithmetic.folders import combine_adapter_folders as merge_adapter_dirs
from tiny_hf import save_hf_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
N = 32  # inputs per task
FACTOR = {"linear": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5}}  # PEFT's default: A's and B's apart
DELTA = {"cat": {}, "svd": {}, "ties_svd": {"density": 0.5}, "dare_ties_svd": {"density": 0.5}}  # on the deltas B A


def task(t: int) -> torch.Tensor:
    """(N, 3) rows ``[task token, x, f_t(x)]``: t=0 maps x -> x + 7, t=1 maps x -> 5x + 3 (mod N),
    into disjoint output ranges."""
    x = torch.arange(N)
    y = (x + 7) % N + 64 if t == 0 else (5 * x + 3) % N + 96
    return torch.stack([torch.full((N,), 120 + t), x + 16, y], 1)


@torch.no_grad()
def accuracy(model, t: int, name: str | None = None) -> float:
    ids = task(t)
    logits = model(ids[:, :2], adapter_names=[name] * N if name else None).logits[:, -1]
    return (logits.argmax(-1) == ids[:, 2]).float().mean().item()


def train_task(base, t: int, out) -> None:
    torch.manual_seed(t)
    model = moetune.load_model(base)
    moetune.add_adapter(
        model, moetune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "experts"])
    )
    opt = torch.optim.AdamW(moetune.trainable_parameters(model).values(), lr=3e-3, weight_decay=0.0)
    ids = task(t)
    labels = ids.masked_fill(torch.arange(3) < 2, -100)  # loss on the answer only
    for step in range(200):  # just until the task is solved: smaller deltas interfere less
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 4 and accuracy(model, t) == 1.0:
            break
    assert accuracy(model, t) == 1.0
    moetune.save_adapter(model, out)


def test_merged_adapters_keep_both_tasks_above_the_base(tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "base")
    folders = [tmp_path / "task0", tmp_path / "task1"]
    for t, folder in enumerate(folders):
        train_task(tmp_path / "base", t, folder)
    model = moetune.load_model(tmp_path / "base")
    base = (accuracy(model, 0) + accuracy(model, 1)) / 2
    means = {}
    for method, opts in {**FACTOR, **DELTA}.items():
        out = merge_adapter_dirs(tmp_path / "base", folders, tmp_path / method, method=method, **opts).out_dir
        moetune.load_adapter(model, out, name=method)
        means[method] = (accuracy(model, 0, method) + accuracy(model, 1, method)) / 2
    print(
        f"merge accuracy (mean of 2 tasks; each adapter alone 100% on its task, base {base:.0%}): "
        + ", ".join(f"{m} {a:.0%}" for m, a in means.items())
    )
    assert base <= 0.1
    for method in DELTA:  # task vectors combined as the TIES/DARE papers do keep most of both tasks
        assert means[method] >= base + 0.3, (method, means[method])
    for method in FACTOR:  # PEFT's factor-level merges run and stay at or above the base (cross terms B_i A_j hurt)
        assert means[method] >= base, (method, means[method])
