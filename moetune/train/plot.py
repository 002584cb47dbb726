"""``loss.png``: train and eval loss vs step, the learning rate on a second y axis; for a
preference objective a second panel below: reward accuracy (train and eval, left axis) and the
reward margin and KL estimate (right axis).

The figure is built with matplotlib's object API on the Agg canvas (no display, no pyplot state)
from the records of ``metrics.jsonl``: a one-adapter run has one train curve, its eval points and
its lr; a run training several adapters together has those three per adapter, in one colour each,
over each adapter's own steps. The PNG is written to a temporary file and renamed over the old one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..outputs import write_file_atomic

Points = list[tuple[int, float]]


@dataclass
class Series:
    """Curves keyed by adapter name (``""`` for a one-adapter run), each a list of (step, value)."""

    loss: dict[str, Points] = field(default_factory=dict)
    eval: dict[str, Points] = field(default_factory=dict)
    lr: dict[str, Points] = field(default_factory=dict)
    preference: dict[str, Points] = field(default_factory=dict)  # metric name -> points (one-adapter runs)


PREFERENCE_METRICS = ("reward_accuracy", "eval_reward_accuracy", "reward_margin", "kl")


def series_from_records(records: list[dict[str, Any]]) -> Series:
    """The curves in ``metrics.jsonl`` records; skipped (non-finite) steps have no loss point."""
    out = Series()
    evals: dict[str, dict[int, float]] = {}
    for r in records:
        per_adapter = r.get("adapters")
        rows = per_adapter.items() if isinstance(per_adapter, dict) else [("", r)]
        for name, row in rows:
            step = row.get("step", r.get("step"))
            if row.get("loss") is not None and not row.get("skipped"):
                out.loss.setdefault(name, []).append((step, row["loss"]))
            if row.get("lr") is not None:
                out.lr.setdefault(name, []).append((step, row["lr"]))
            if row.get("eval_loss") is not None:
                evals.setdefault(name, {})[step] = row["eval_loss"]  # one point per step: the last
        for key in PREFERENCE_METRICS if not isinstance(per_adapter, dict) else ():
            if r.get(key) is not None and not r.get("skipped"):
                out.preference.setdefault(key, []).append((r["step"], r[key]))
    out.eval = {name: sorted(points.items()) for name, points in evals.items()}
    return out


def loss_figure(series: Series, *, title: str | None = None) -> Figure:
    """The plot of ``series``: loss (left axis) and learning rate (right axis) against step."""
    fig = Figure(figsize=(8.0, 7.6 if series.preference else 4.8), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if series.preference else fig.add_subplot()
    names = list(dict.fromkeys([*series.loss, *series.eval, *series.lr]))
    lr_ax = ax.twinx() if series.lr else None
    for i, name in enumerate(names):
        color, prefix = f"C{i}", f"{name} " if name else ""
        if series.loss.get(name):
            ax.plot(
                *zip(*series.loss[name]),
                color=color,
                linewidth=1.5,
                marker="o" if len(series.loss[name]) == 1 else None,
                label=f"{prefix}train loss",
            )
        if series.eval.get(name):
            ax.plot(
                *zip(*series.eval[name]),
                color=color,
                linestyle="--",
                marker="o",
                markersize=4,
                label=f"{prefix}eval loss",
            )
        if lr_ax is not None and series.lr.get(name):
            lr_ax.plot(
                *zip(*series.lr[name]),
                color=color if name else "0.45",
                linestyle=":",
                linewidth=1.2,
                label=f"{prefix}lr",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: loss and learning rate" if title else "loss and learning rate")
    handles, labels = ax.get_legend_handles_labels()
    if lr_ax is not None:
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    if series.preference:
        preference_panel(fig.add_subplot(2, 1, 2, sharex=ax), series.preference)
    return fig


def preference_panel(ax, curves: dict[str, Points]) -> None:
    """Reward accuracy (left axis, 0 to 1) and reward margin / KL estimate (right axis) against step."""
    right = ax.twinx()
    styles = {
        "reward_accuracy": (ax, "C2", "-", "reward accuracy"),
        "eval_reward_accuracy": (ax, "C2", "--", "eval reward accuracy"),
        "reward_margin": (right, "C3", "-", "reward margin"),
        "kl": (right, "C4", ":", "KL estimate"),
    }
    for key, points in curves.items():
        axis, color, style, label = styles[key]
        marker = "o" if len(points) == 1 or key.startswith("eval") else None
        axis.plot(*zip(*points), color=color, linestyle=style, marker=marker, markersize=4, label=label)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("reward accuracy")
    right.set_ylabel("margin / KL")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles + more[0], labels + more[1], loc="lower right", fontsize="small")


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write ``fig`` as PNG to ``out`` atomically: a reader sees the old file or the new one."""
    return write_file_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))


def plot_metrics(records: list[dict[str, Any]], out: str | Path, *, title: str | None = None) -> Path | None:
    """Write ``loss.png`` for the ``metrics.jsonl`` records of a run; None when no step has a loss.

    Args:
        records: the run's metrics records (``loss``, ``lr``, ``eval_loss``, per-adapter ``adapters``).
        out: the PNG path.
        title: the run's name, shown in the title.
    """
    series = series_from_records(records)
    if not any(series.loss.values()):
        return None
    return save_figure(loss_figure(series, title=title), out)


def plot_losses(
    series: dict[str, Points],
    out: str | Path,
    *,
    lr: Points | dict[str, Points] | None = None,
    title: str | None = None,
) -> Path:
    """The same plot from ready curves: ``{"train": [...], "eval": [...]}`` for one adapter, or
    ``{adapter name: train points}``; ``lr`` one list of (step, lr) or one per adapter."""
    if set(series) <= {"train", "eval"}:
        curves = Series(loss={"": series.get("train", [])}, eval={"": series.get("eval", [])})
        curves.lr = {"": lr} if isinstance(lr, list) else dict(lr or {})
    else:
        curves = Series(loss=dict(series), lr=dict(lr) if isinstance(lr, dict) else {})
    curves.loss = {k: v for k, v in curves.loss.items() if v}
    curves.eval = {k: v for k, v in curves.eval.items() if v}
    return save_figure(loss_figure(curves, title=title), out)
