"""A run's final config, computed once before anything is built.

Everything a run derives from its config and its surroundings is filled here: the method's default
LR, the objective, whether batches are packed, the label names of a classifier, gradient accumulation when resuming
under another process count, absolute data and teacher paths (so the run resumes from any folder) and the MLflow
store. The result is frozen: RUN/config.yaml is exactly what the run used, and nothing changes it afterwards.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, build_config
from ..errors import ConfigError, UserError
from ..models import REGISTRY
from ..tracking import default_mlflow_uri
from .checkpoint import read_trainer_state


def resolve_packing(cfg: Config, method) -> bool:
    """`train.packing`: None packs wherever it is exact; true where it cannot be is an error."""
    reason = None
    if cfg.task == "classification":
        reason = "classification batches one example per row"
    elif method.virtual_tokens:
        reason = f"method {cfg.method} prepends virtual tokens to every row"
    if reason is None:
        return cfg.train.packing is not False
    if cfg.train.packing:
        raise ConfigError(f"train.packing: true does not work here: {reason}; remove it or set it to false")
    return False


def resumed_grad_accum(cfg: Config, ckpt: Path, world: int) -> int:
    """Resuming under another process count: the grad_accum that makes a step take as many examples as
    the checkpoint's steps did (same data order, same schedule, same numbers)."""
    before = read_trainer_state(ckpt).get("examples_per_step")
    t = cfg.train
    if before is None or before == t.batch_size * t.grad_accum * world:
        return t.grad_accum
    if before % (t.batch_size * world):
        raise UserError(
            f"{ckpt}: its steps took {before} examples; batch_size {t.batch_size} x {world} processes does not "
            f"divide that; choose train.batch_size so that batch_size x processes divides {before}"
        )
    return before // (t.batch_size * world)


def resolve_run_config(cfg: Config, method, labels: list[str] | None = None, grad_accum: int | None = None) -> Config:
    """The frozen config the run trains with (`cfg` itself is not changed)."""
    d = cfg.to_dict()
    train, data = d["train"], d["data"]
    if train["lr"] is None:
        train["lr"] = method.default_lr
    train["packing"] = resolve_packing(cfg, method)
    if cfg.task == "preference" and train["objective"] is None:
        train["objective"] = "dpo"
    if grad_accum is not None:
        train["grad_accum"] = grad_accum
    if labels is not None:
        data["labels"] = list(labels)
    for key in ("train", "eval"):
        if data[key]:
            data[key] = str(Path(data[key]).resolve())
    if d.get("mlflow") is not None and d["mlflow"]["tracking_uri"] is None:
        d["mlflow"]["tracking_uri"] = default_mlflow_uri(cfg.out_dir)
    if (d.get("distill") or {}).get("prompts"):
        d["distill"]["prompts"] = str(Path(d["distill"]["prompts"]).resolve())
    teacher = (d.get("distill") or {}).get("teacher")
    if (
        teacher and teacher not in REGISTRY and Path(teacher).is_dir()
    ):  # a run or model folder: found again from any working directory
        d["distill"]["teacher"] = str(Path(teacher).resolve())
    return build_config(d).make_read_only()
