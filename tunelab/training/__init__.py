"""Training: the loop (recipe), optimizer/scheduler groups, checkpoints, accounting, run directory."""

__all__ = ["TrainResult", "train"]


def __getattr__(name: str):
    # the loop (torch, transformers, peft) loads on first use: `tunelab runs` imports this package's
    # torch-free modules (checkpoint_dirs, lock, run_dir) and lists runs without it
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
