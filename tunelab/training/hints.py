"""Read the loss curves at the end of a run and say what they suggest (the seeds' troubleshooting list)."""

from __future__ import annotations

import math


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def curve_hints(records: list[dict]) -> list[str]:
    """Hints from metrics.jsonl records: overfitting, underfitting, instability. Empty when all looks fine."""
    train = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
    hints = []
    if len(evals) >= 3:
        best = min(range(len(evals)), key=evals.__getitem__)
        if best < len(evals) - 1 and evals[-1] > evals[best] * 1.05 and _mean(train[-3:]) < _mean(train[:3]):
            hints.append(
                f"overfitting: eval loss rose from {evals[best]:.4f} to {evals[-1]:.4f} while the train loss kept "
                "falling; use early stopping (train.early_stopping_patience), fewer epochs, more data, or more "
                "dropout/weight decay"
            )
    if len(train) >= 10:
        n = max(3, len(train) // 5)
        first, last = _mean(train[:n]), _mean(train[-n:])
        if last > 0.95 * first:
            hints.append(
                f"underfitting: the train loss barely moved ({first:.4f} -> {last:.4f}); raise train.lr, train "
                "longer, or give the method more capacity (lora.r, target_modules: all-linear)"
            )
        jumps = sum(1 for a, b in zip(train, train[1:]) if b > 2.0 * a and b - a > 0.5)
        if jumps >= max(2, len(train) // 20):
            hints.append(
                f"instability: the train loss jumped more than 2x {jumps} times; lower train.lr, add warmup "
                "(train.warmup_ratio), or clip gradients harder (train.max_grad_norm)"
            )
    return hints
