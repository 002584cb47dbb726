"""``train.compile: true``: each decoder block's forward is compiled (said once at INFO) and the run
trains as the eager one does (sequence lengths change between batches; evaluation runs without grad)."""

from __future__ import annotations

import logging

from moetune.config import load_train_config
from moetune.model import CausalLM
from moetune.train.trainer import train
from train_helpers import losses, write_run

OPTIM = {"lr": 3e-3, "max_steps": 2, "batch_size": 4, "aux_loss_coef": 0.01}
LOGGING = {"progress": False, "eval_every": 2}


def test_compiled_blocks_train_like_eager(tmp_path, monkeypatch, caplog):
    real = CausalLM.compile_blocks
    # the run's default backend (inductor) takes minutes to build kernels on a 2-core CPU; aot_eager
    # traces forward and backward the same way and runs them eagerly
    monkeypatch.setattr(CausalLM, "compile_blocks", lambda self: real(self, backend="aot_eager"))
    train(load_train_config(write_run(tmp_path / "eager", optim=OPTIM, logging=LOGGING)))
    compiled_run = write_run(tmp_path / "compiled", optim=OPTIM, logging=LOGGING, train={"compile": True})
    with caplog.at_level(logging.INFO, logger="moetune"):
        train(load_train_config(compiled_run))
    said = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(said) == 1 and "fullgraph=True" in said[0], said
    eager, compiled = losses(tmp_path / "eager" / "run"), losses(tmp_path / "compiled" / "run")
    assert len(eager) == len(compiled) == 2
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-5, (eager, compiled)
