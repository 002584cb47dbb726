"""loss.png is a real plot: train and eval loss vs step, lr on a second axis, labelled axes, a
legend and the run name; one set of curves per adapter in multi-adapter runs; written atomically."""

from __future__ import annotations

import json
import struct

import pytest

from moetune.config import load_train_config
from moetune.train import plot
from moetune.train.plot import loss_figure, plot_losses, plot_metrics, series_from_records
from moetune.train.trainer import train
from train_helpers import write_run

SINGLE = [
    {"step": 1, "loss": 3.0, "lr": 1e-3, "skipped": False},
    {"step": 2, "loss": 2.5, "lr": 2e-3, "skipped": False},
    {"step": 3, "loss": 9.9, "lr": 2e-3, "skipped": True},
    {"step": 4, "loss": 2.0, "lr": 1.5e-3, "skipped": False, "eval_loss": 2.2},
    {"step": 4, "eval_loss": 2.1},
]
MULTI = [
    {
        "step": s,
        "loss": 2.0,
        "lr": 1e-3,
        "eval_loss": 2.5 if s == 2 else None,
        "adapters": {
            "a": {
                "step": s,
                "loss": 3.0 - s / 2,
                "lr": 1e-3 * s,
                "skipped": False,
                **({"eval_loss": 2.4} if s == 2 else {}),
            },
            "b": {"step": s, "loss": 4.0 - s, "lr": 5e-4, "skipped": s == 1},
        },
    }
    for s in (1, 2)
]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_series_from_single_adapter_records():
    s = series_from_records(SINGLE)
    assert s.loss == {"": [(1, 3.0), (2, 2.5), (4, 2.0)]}  # the skipped step is not a loss
    assert s.eval == {"": [(4, 2.1)]}  # one point per step, the last written
    assert s.lr == {"": [(1, 1e-3), (2, 2e-3), (3, 2e-3), (4, 1.5e-3)]}


def test_figure_has_labelled_axes_lr_axis_legend_and_title():
    fig = loss_figure(series_from_records(SINGLE), title="my-run")
    loss_ax, lr_ax = fig.axes
    assert loss_ax.get_xlabel() == "step" and loss_ax.get_ylabel() == "loss"
    assert lr_ax.get_ylabel() == "learning rate"
    assert "my-run" in loss_ax.get_title()
    assert _legend(fig) == ["train loss", "eval loss", "lr"]
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == [1e-3, 2e-3, 2e-3, 1.5e-3]
    fig.canvas.draw()
    assert [t.get_text() for t in loss_ax.get_yticklabels() if t.get_text()]  # numbers on the axes
    assert [t.get_text() for t in lr_ax.get_yticklabels() if t.get_text()]


def test_multi_adapter_gets_curves_per_adapter():
    s = series_from_records(MULTI)
    assert s.loss == {"a": [(1, 2.5), (2, 2.0)], "b": [(2, 2.0)]}
    assert s.eval == {"a": [(2, 2.4)]} and s.lr["a"] == [(1, 1e-3), (2, 2e-3)]
    legend = _legend(loss_figure(s))
    assert {"a train loss", "b train loss", "a eval loss", "a lr", "b lr"} <= set(legend)


def test_plot_metrics_writes_a_real_png_atomically(tmp_path):
    out = tmp_path / "loss.png"
    out.write_bytes(b"old")
    assert plot_metrics(SINGLE, out, title="run") == out
    width, height = _png_size(out)
    assert width >= 600 and height >= 350 and out.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no temp file left
    assert plot_metrics([{"step": 1, "eval_loss": 2.0}], tmp_path / "none.png") is None  # nothing to plot


def test_a_failed_write_keeps_the_previous_plot(tmp_path, monkeypatch):
    out = tmp_path / "loss.png"
    out.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plot.Figure, "savefig", broken)
    with pytest.raises(OSError):
        plot_metrics(SINGLE, out)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_plot_losses_keeps_its_series_signature(tmp_path):
    out = plot_losses(
        {"train": [(1, 2.0), (2, 1.5)], "eval": [(2, 1.7)]}, tmp_path / "loss.png", lr=[(1, 1e-3), (2, 5e-4)]
    )
    assert _png_size(out)[0] >= 600


def test_training_run_plots_loss_and_lr(tmp_path, monkeypatch):
    seen = []
    real = plot.loss_figure
    monkeypatch.setattr(plot, "loss_figure", lambda series, **kw: seen.append((series, kw)) or real(series, **kw))
    cfg = write_run(tmp_path, optim={"lr": 3e-3, "max_steps": 4, "batch_size": 8, "warmup_steps": 2})
    train(load_train_config(cfg))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ((series, kw),) = seen
    assert [lr for _, lr in next(iter(series.lr.values()))] == [r["lr"] for r in records if "lr" in r]
    assert series.eval and kw.get("title") == "run"
    assert _png_size(run / "loss.png")[0] >= 600


def test_preference_metrics_get_their_own_panel(tmp_path):
    records = [
        {"step": 1, "loss": 0.69, "lr": 1e-3, "reward_accuracy": 0.0, "reward_margin": 0.0, "kl": 0.0},
        {"step": 2, "loss": 0.5, "lr": 1e-3, "reward_accuracy": 0.75, "reward_margin": 0.4, "kl": 0.1},
        {"step": 2, "eval_loss": 0.55, "eval_reward_accuracy": 0.8},
    ]
    series = series_from_records(records)
    assert series.preference["reward_accuracy"] == [(1, 0.0), (2, 0.75)]
    assert series.preference["eval_reward_accuracy"] == [(2, 0.8)] and len(series.preference) == 4
    assert len(loss_figure(series).axes) == 4  # loss + lr, accuracy + margin/KL
    assert plot_metrics(records, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
