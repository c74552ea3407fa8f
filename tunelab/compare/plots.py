"""The comparison's two figures: eval-loss curves of every method (on steps and on tokens), and quality
against cost (metric vs peak memory, metric vs wall time) with each Pareto front marked."""

from __future__ import annotations

from pathlib import Path

from ..eval.plots import _pyplot, _save
from .choose import COSTS, higher_is_better, pareto_front, value

MIB = 2**20


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_eval_curves(rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    curves = [r for r in rows if r.get("curve")]
    for ax, key, label in ((axes[0], "step", "optimizer step"), (axes[1], "tokens_seen", "training tokens seen")):
        for r in curves:
            points = [(p[key], p["eval_loss"]) for p in r["curve"] if p.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=r["method"])
        if not curves:
            _empty(ax, "no eval loss (no validation split, or no method finished)")
        ax.set_xlabel(label)
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
    axes[0].set_title("eval loss by step")
    axes[1].set_title("eval loss by tokens")
    if curves:
        axes[1].legend()
    return _save(fig, path)


def plot_quality_cost(rows: list[dict], metric: str, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    ok = [r for r in rows if r["status"] == "ok" and value(r, metric) is not None]
    for ax, cost in zip(axes, COSTS):
        scale = MIB if cost == "peak_mem_bytes" else 1.0
        for r in ok:
            x, y = r[cost] / scale, value(r, metric)
            ax.scatter([x], [y], s=40)
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4))
        front = [r for name in pareto_front(ok, metric, cost) for r in ok if r["method"] == name]
        if front:
            ax.plot(
                [r[cost] / scale for r in front],
                [value(r, metric) for r in front],
                color="tab:red",
                linestyle="--",
                marker="*",
                markersize=12,
                label="Pareto front",
            )
            ax.legend()
        if not ok:
            _empty(ax, f"no finished method has {metric}")
        ax.set_xlabel("peak memory (MiB)" if cost == "peak_mem_bytes" else "training wall time (s)")
        ax.set_ylabel(metric if higher_is_better(metric) else f"{metric} (lower is better)")
        ax.set_title(f"{metric} vs {COSTS[cost]}")
        ax.grid(alpha=0.3)
    return _save(fig, path)
