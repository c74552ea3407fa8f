"""PNG plots of a run directory: loss curves (train + eval, learning rate) and the confusion matrix."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from ..io import atomic_write_bytes, read_metrics
from ..log import log

# Font names that usually cover CJK; used as fallbacks only when a label needs them.
_CJK_FONT_HINTS = ("CJK", "WenQuanYi", "Noto Sans SC", "Source Han", "SimHei", "Microsoft YaHei", "PingFang", "Heiti")


def _pyplot():
    # Imported lazily so `import tunelab` stays light; Agg renders without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss_curves(run_dir) -> Path | None:
    """Write RUN/plots/loss.png: train loss per step, eval loss per evaluated step, learning rate below.

    Returns the path, or None (writing nothing) when metrics.jsonl is missing or has no finite loss.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        return None
    records = read_metrics(metrics_path)
    train = _series(records, "loss")
    evals = _series(records, "eval_loss")
    lr = _series(records, "lr")
    if not train[0] and not evals[0]:
        return None

    plt = _pyplot()
    fig, (ax, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, layout="constrained"
    )
    if train[0]:
        ax.plot(*train, label="train loss", linewidth=1.2)
    if evals[0]:
        ax.plot(*evals, marker="o", linestyle="--", label="eval loss")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.resolve().name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if lr[0]:
        ax_lr.plot(*lr, color="tab:green", linewidth=1.0)
    else:
        ax_lr.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=ax_lr.transAxes)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    return _save(fig, run_dir / "plots" / "loss.png")


def label_names(run_dir: Path, n: int) -> list[str]:
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        labels = config["data"]["labels"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        labels = None  # no config or no label names: number the classes
    if isinstance(labels, list) and len(labels) == n:
        return [str(label) for label in labels]
    return [str(i) for i in range(n)]


def _font_family(labels: list[str]) -> list[str] | None:
    """A fallback family list when a label is non-ASCII and a CJK font is installed; None otherwise."""
    if all(label.isascii() for label in labels):
        return None
    from matplotlib import font_manager, rcParams

    cjk = sorted({f.name for f in font_manager.fontManager.ttflist if any(h in f.name for h in _CJK_FONT_HINTS)})
    return [*rcParams["font.sans-serif"][:1], *cjk] if cjk else None


def plot_confusion_matrix(run_dir, name: str | None = None) -> Path | None:
    """Write RUN/plots/confusion_matrix.png from eval.json (rows = true label, columns = predicted);
    with `name`, plots/confusion_matrix-<name>.png from eval-<name>.json (`tunelab eval --data <name>.ext`).

    Returns the path, or None (writing nothing) when the eval file has no eval_confusion_matrix.
    """
    run_dir = Path(run_dir)
    suffix = f"-{name}" if name else ""
    try:
        matrix = json.loads((run_dir / f"eval{suffix}.json").read_text(encoding="utf-8")).get("eval_confusion_matrix")
    except (OSError, ValueError, AttributeError):
        return None
    if (
        not matrix
        or not isinstance(matrix, list)
        or not all(isinstance(row, list) and len(row) == len(matrix) for row in matrix)
    ):
        return None

    import numpy as np

    try:
        counts = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        return None
    counts = np.nan_to_num(counts)
    n = len(counts)
    labels = label_names(run_dir, n)
    font = {"fontfamily": family} if (family := _font_family(labels)) else {}

    plt = _pyplot()
    size = min(4 + 0.5 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", **font)
    ax.set_yticks(range(n), labels, **font)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"{run_dir.resolve().name}: confusion matrix" + (f" ({name})" if name else ""))
    if n <= 30:  # beyond that the numbers are unreadable anyway
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(n):
            for j in range(n):
                value = counts[i, j]
                text = f"{int(value)}" if value == int(value) else f"{value:.2f}"
                ax.text(j, i, text, ha="center", va="center", color="white" if value > threshold else "black")
    return _save(fig, run_dir / "plots" / f"confusion_matrix{suffix}.png")


def plot_run(run_dir) -> list[Path]:
    """Write every plot that applies to the run; returns the paths written."""
    return [p for p in (plot_loss_curves(run_dir), plot_confusion_matrix(run_dir)) if p is not None]


def write_plots(run_dir) -> None:
    """plot_run for the end of training or evaluation: a plotting failure never fails the run."""
    try:
        plot_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's results are already saved
        log(f"note: plots were not written: {exc}")
