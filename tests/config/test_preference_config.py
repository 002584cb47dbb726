"""``optim.objective`` and ``optim.preference``: defaults, and one-line refusals of what does not fit."""

from __future__ import annotations

import pytest

from moetune.config import ConfigError, TrainConfig, from_dict


def _config(optim: dict | None = None, **sections) -> TrainConfig:
    data = {
        "model": {"path": "m"},
        "data": {"train": "t.jsonl"},
        "optim": {"max_steps": 2, "batch_size": 2, "objective": "dpo", **(optim or {})},
        "checkpoint": {"output_dir": "out"},
        **sections,
    }
    return from_dict(TrainConfig, data, where="run.yaml")


def test_defaults_per_objective():
    dpo = _config()
    assert dpo.optim.preference.beta == 0.1 and dpo.optim.aux_loss_coef == 0.001
    assert _config({"objective": "simpo"}).optim.preference.beta == 2.0
    assert _config({"aux_loss_coef": 0.0}).optim.aux_loss_coef == 0.0  # written: kept, even when equal to sft's default
    sft = _config({"objective": "sft"})
    assert sft.optim.preference is None and sft.optim.aux_loss_coef == 0.0


@pytest.mark.parametrize(
    "optim, sections, message",
    [
        (
            {"preference": {"gamma": 1.0}},
            {},
            "run.yaml: optim.preference.gamma is an option of objective simpo, not of dpo",
        ),
        ({"objective": "orpo", "preference": {"precompute_reference": True}}, {}, "precompute_reference is an option"),
        ({"preference": {"label_smoothing": 0.1}}, {}, "label_smoothing is an option of objective simpo, not of dpo"),
        ({"objective": "sft", "preference": {}}, {}, "optim.preference needs a preference objective"),
        ({"preference": {"beta": 0}}, {}, "optim.preference.beta must be a number > 0"),
        ({"objective": "dop"}, {}, "did you mean 'dpo'"),
        ({"distill": {"teacher": "base"}}, {}, "optim.distill cannot be combined with objective: dpo"),
        ({}, {"data": {"train": "t.jsonl", "packing": True}}, "data.packing: objective dpo needs false"),
        ({}, {"data": {"train": "t.jsonl", "train_on_prompt": True}}, "only completion tokens are scored"),
        ({"objective": "kto", "batch_size": 1}, {}, "optim.batch_size: objective kto needs at least 2"),
        ({"preference": {"reference": "initial"}}, {}, "optim.preference.reference: objective dpo needs an adapter"),
        ({"objective": "simpo", "preference": {"reference": "initial"}}, {}, "reference is an option of objective"),
        ({}, {"adapters": [{"name": "a"}, {"name": "b"}]}, "adapters: objective dpo needs one adapter"),
    ],
)
def test_refusals_are_one_line(optim, sections, message):
    with pytest.raises(ConfigError) as err:
        _config(optim, **sections)
    assert message in str(err.value) and "\n" not in str(err.value)
