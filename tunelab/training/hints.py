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
    return hints + preference_hints(records)


def _series(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def preference_hints(records: list[dict]) -> list[str]:
    """Hints from the reward curves of a preference run (DPO/IPO/ORPO); empty for other runs."""
    accuracy, margin = _series(records, "reward_accuracy"), _series(records, "rewards_margin")
    chosen = _series(records, "logps_chosen")
    if len(accuracy) < 6 or len(margin) != len(accuracy):
        return []
    n = max(3, len(accuracy) // 5)
    hints = []
    acc_first, acc_last = _mean(accuracy[:n]), _mean(accuracy[-n:])
    margin_first, margin_last = _mean(margin[:n]), _mean(margin[-n:])
    if margin_last > 3 * max(margin_first, 0.1) and margin_last > 1.0 and acc_last - acc_first < 0.05:
        hints.append(
            f"reward margins grew from {margin_first:.3f} to {margin_last:.3f} while reward accuracy stalled "
            f"({acc_first:.2f} -> {acc_last:.2f}): the model pushes apart pairs it already ranks right instead of "
            "fixing the ones it gets wrong (over-optimisation); raise preference.beta, lower train.lr, stop "
            "earlier, or check the pairs it keeps getting wrong for swapped or noisy labels"
        )
    elif acc_last < 0.6:
        hints.append(
            f"reward accuracy stays near chance ({acc_last:.2f} at the end): the model barely separates chosen "
            "from rejected; raise train.lr, train longer, or check that the pairs really differ in a learnable way"
        )
    if len(chosen) == len(accuracy) and _mean(chosen[-n:]) < _mean(chosen[:n]) - 5.0:
        hints.append(
            f"the chosen answers' log-probability fell ({_mean(chosen[:n]):.1f} -> {_mean(chosen[-n:]):.1f}): the "
            "rejected ones are pushed down faster, but the preferred answers get less likely too; raise "
            "preference.beta, lower train.lr, or use train.objective: orpo (it keeps an SFT loss on chosen)"
        )
    return hints
