"""`tunelab distill`: a training run whose student learns from a teacher (knowledge distillation).

A distillation run is an ordinary run (tunelab.training: checkpoints, resume, the registry) whose config has a
`distill` section: the teacher (a finished run or a model), the temperature and alpha of the loss
(tunelab.distill.loss), and optionally a cache of the teacher's logits. The student is the run's `model`
(the same tokenizer as the teacher), or, with `distill.keep_every: k`, the teacher's blocks 0, k, 2k, ...
with their weights (tunelab.blocks.keep_blocks). The student trains with any method.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def with_student(cfg):
    """`cfg` with `model` naming the student: for distill.keep_every, the student cut from the teacher (built
    once); otherwise cfg itself."""
    from ..config import build_config
    from .teacher import build_student

    if cfg.distill.keep_every is None:
        return cfg
    if "model" in cfg.model_fields_set:
        raise ConfigError(
            f"distill.keep_every builds the student from the teacher, so `model: {cfg.model}` is not used: remove "
            "`model`, or remove distill.keep_every to distill into that model"
        )
    return build_config(cfg.to_dict() | {"model": str(build_student(cfg))})


def distill(config, overrides: list[str] | None = None, resume: str | Path | None = None, progress: bool = True):
    """Train a student from the `distill` section of a config (a YAML path, a dict or a Config), or resume a
    distillation run. Returns the TrainResult; its summary has `parent` (the teacher) and `distill` (the
    teacher's and the student's params, eval loss and forward speed)."""
    from ..config import Config, apply_overrides, build_config, load_config
    from ..training import train

    if resume is not None:
        cfg = load_config(Path(resume) / "config.yaml", overrides, saved_run=True) if Path(resume).is_dir() else None
        if cfg is not None and cfg.distill is None:
            raise ConfigError(f"{resume}: not a distillation run (its config has no distill section)")
        return train(None, overrides, resume=resume, progress=progress)
    if config is None or isinstance(config, str | Path):
        cfg = load_config(config, overrides)
        source = str(config) if config is not None else "<overrides>"
    else:
        data = config.to_dict() if isinstance(config, Config) else dict(config)
        cfg, source = build_config(apply_overrides(data, list(overrides or []))), "<config>"
    if cfg.distill is None:
        raise ConfigError(
            f"{source}: tunelab distill needs a `distill` section (distill.teacher: a run folder or model)"
        )
    return train(config, overrides, progress=progress)
