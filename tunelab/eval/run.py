"""`tunelab eval`: evaluate a run (or a bare model) on its validation split or a given file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import apply_overrides, build_config, load_config
from ..data import prepare_data
from ..errors import UserError
from ..io import atomic_write_json
from .loss import evaluate_loss


def evaluate_run(run_or_model: str, data: Optional[str] = None, overrides: Optional[list[str]] = None) -> dict:
    from ..loading import is_run_dir, load

    run = Path(run_or_model)
    is_run = is_run_dir(run)
    if is_run:
        cfg = load_config(run / "config.yaml", overrides)
    else:
        cfg = build_config(apply_overrides({"model": run_or_model}, overrides or []))
    if data:
        cfg = build_config(apply_overrides(cfg.to_dict(), [f"data.train={data}", "data.eval=null", "data.val_fraction=0"]))
    elif not is_run:
        raise UserError("evaluating a bare model needs --data FILE")
    model, tokenizer = load(run_or_model)
    prepared = prepare_data(cfg, tokenizer)
    examples = prepared.train if data else prepared.val
    if not examples:
        raise UserError("the evaluation set is empty (the run has no validation split; pass --data FILE)")
    metrics = evaluate_loss(model, examples, tokenizer.pad_token_id, cfg.train.batch_size)
    metrics["examples"] = len(examples)
    metrics["data"] = data or "validation split"
    if is_run:
        atomic_write_json(run / "eval.json", metrics)
    return metrics
