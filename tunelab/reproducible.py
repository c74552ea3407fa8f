"""What makes a run repeatable: its seeds, and the library versions it ran with."""

from __future__ import annotations

import platform
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (initial weights, dropout, data order)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict:
    """The versions a run's numbers depend on (saved in summary.json and bench results)."""
    from importlib.metadata import version  # not the packages themselves: importing peft takes seconds

    from . import __version__

    return {
        "tunelab": __version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "python": platform.python_version(),
    }
