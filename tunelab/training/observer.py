"""Hooks a caller gives one run (the sweep reports evaluations to its trial); the defaults do nothing."""

from __future__ import annotations

from pathlib import Path


class RunObserver:
    def started(self, run_dir: Path) -> None:
        """The run's folder exists and training is about to begin (rank 0 only)."""

    def evaluated(self, step: int, metrics: dict) -> str | None:
        """After each periodic evaluation (every process, the same metrics): a returned reason stops the run
        gracefully after this step, as early stopping does (checkpoint, final evaluation, artifact, summary)."""
        return None
