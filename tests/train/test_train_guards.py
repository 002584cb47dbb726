"""Non-finite guard, activation checkpointing exactness, LoRA+ learning rates."""

import json

import torch

import moetune
from moetune.config import load_train_config
from moetune.train.setup import prepare_run
from moetune.train.trainer import Trainer
from tiny_hf import save_hf_model
from train_helpers import loraplus_optimizer, lr_of, write_run


def test_non_finite_step_is_skipped_and_reported(tmp_path):
    config = load_train_config(write_run(tmp_path))
    parts = prepare_run(config)
    calls = {"n": 0}

    def poison(module, args, output):  # the 3rd forward's logits become NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    # the loss path runs lm_head once per chunk (plus a recompute in backward); poison by forward count
    handle = parts.model.lm_head.register_forward_hook(poison)
    trainer = Trainer(config, parts)
    result = trainer.run()
    handle.remove()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert result.skipped_steps == 1 and len(skipped) == 1
    assert all(torch.isfinite(p).all() for ps in trainer.params.values() for p in ps.values())


def test_activation_checkpointing_gives_identical_loss_and_grads(tmp_path):
    save_hf_model("qwen3_moe", tmp_path)
    model = moetune.load_model(tmp_path)
    moetune.add_adapter(model, moetune.LoraConfig(r=4, dropout=0.1, target_modules=["q_proj", "o_proj", "experts"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.train()
    ids = torch.randint(0, 128, (2, 10))
    results = []
    for ckpt in (False, True):
        model.set_gradient_checkpointing(ckpt)
        torch.manual_seed(3)
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad()
    assert results[0][0] == results[1][0]
    assert all(torch.allclose(results[0][1][n], results[1][1][n], atol=1e-6) for n in results[0][1])


def test_loraplus_gives_b_matrices_a_higher_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = loraplus_optimizer({"x.lora_A.default": a, "x.lora_B.default": b}, b_side={"x.lora_B.default"})
    lrs = lr_of(opt)
    assert lrs[id(a)] == 1e-3 and lrs[id(b)] == 16e-3
