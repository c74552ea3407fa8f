"""`tunelab runs`: a table of the runs under a folder, finished or not, with what state each is in.

Status: finished (a readable summary.json), running (a process holds its lock), failed (failure.json:
an error stopped it), interrupted (a complete checkpoint and no summary: `--resume` continues it),
broken (a summary or config that cannot be read, named with the reason).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import read_yaml
from .errors import UserError
from .io import read_json_object
from .training.checkpoint import latest_checkpoint
from .training.lock import is_locked
from .training.run_dir import FAILURE_FILE


def _number(value):
    return round(value, 4) if isinstance(value, float) else value if isinstance(value, int) else None


def _text(value):
    return value if isinstance(value, str) else None


def run_status(run: Path) -> tuple[str, dict, str]:
    """(status, summary or {}, detail) of one run folder."""
    if is_locked(run):
        return "running", {}, ""
    if (run / "summary.json").exists():
        try:
            return "finished", read_json_object(run / "summary.json"), ""
        except UserError as exc:
            return "broken", {}, str(exc)
    if (run / FAILURE_FILE).exists():
        try:
            return "failed", {}, str(read_json_object(run / FAILURE_FILE).get("error", ""))[:200]
        except UserError as exc:
            return "broken", {}, str(exc)
    if latest_checkpoint(run / "checkpoints") is not None:
        return "interrupted", {}, f"resume: tunelab train --resume {run}"
    return "broken", {}, "no summary.json and no complete checkpoint"


def _config_fields(run: Path) -> dict:
    try:
        config = read_yaml((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return {k: config.get(k) for k in ("method", "model")} if isinstance(config, dict) else {}


def list_runs(root="runs") -> list[dict]:
    """One row per run folder (a folder holding config.yaml or summary.json) under `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    rows = []
    for run in sorted(
        p for p in root.iterdir() if p.is_dir() and ((p / "config.yaml").exists() or (p / "summary.json").exists())
    ):
        status, s, detail = run_status(run)
        if not s.get("method"):  # not finished (or an empty summary): the config still says what it trains
            s = {**_config_fields(run), **s}
        evals = s.get("eval") if isinstance(s.get("eval"), dict) else {}
        rows.append(
            {
                "run": run.name,
                "status": status,
                "method": _text(s.get("method")),
                "model": _text(s.get("model")),
                "final_train_loss": _number(s.get("final_train_loss")),
                "eval_loss": _number(evals.get("eval_loss")),
                "config_hash": _text(s.get("config_hash")),
                "detail": detail,
            }
        )
    return rows
