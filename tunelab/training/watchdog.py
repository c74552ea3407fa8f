"""Stop a run that has stopped learning for good: a collapsed model or a diverging loss.

- Collapse: the gradient norm is exactly zero for COLLAPSE_STEPS steps in a row while the loss is not:
  nothing can change any more (`train.lr: 1e9` ends here: every logit equal, loss = ln(vocab)).
- Divergence: the median loss of the last WINDOW steps is more than twice the best such median and
  more than 1 nat above it (the loss has lost what training had gained, and then some).
Non-finite losses are the loop's own check (skipped steps, five in a row stop the run).
"""

from __future__ import annotations

import math
import statistics

COLLAPSE_STEPS = 3
WINDOW = 5


class Watchdog:
    def __init__(self, uniform_loss: float | None = None):
        self.uniform_loss = uniform_loss  # ln(vocabulary or classes): the loss of predicting nothing
        self.losses: list[float] = []
        self.zero_grad_steps = 0
        self.best_median = math.inf

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Record one finite step; returns why the run must stop, or None."""
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0.0 and loss > 0 else 0
        if self.zero_grad_steps >= COLLAPSE_STEPS:
            uniform = ""
            if self.uniform_loss and abs(loss - self.uniform_loss) < 1e-3 * self.uniform_loss:
                uniform = f" = ln(vocabulary) {self.uniform_loss:.4f}: the model predicts every token alike"
            return (
                f"the model collapsed at step {step}: gradients exactly zero for {COLLAPSE_STEPS} steps, loss "
                f"{loss:.4f}{uniform}"
            )
        self.losses.append(loss)
        if len(self.losses) < WINDOW:
            return None
        median = statistics.median(self.losses[-WINDOW:])
        self.best_median = min(self.best_median, median)
        if median > 2 * self.best_median and median > self.best_median + 1.0:
            return (
                f"the loss diverged at step {step}: the median of the last {WINDOW} steps is {median:.4f}, "
                f"against {self.best_median:.4f} at best"
            )
        return None
