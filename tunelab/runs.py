"""`tunelab runs`: a table of the runs under a folder, finished or not, with what state each is in.

Status: finished (a readable summary.json), running (a process holds its lock), failed (failure.json:
an error stopped it), interrupted (a complete checkpoint and no summary: `--resume` continues it),
broken (a summary or config that cannot be read, named with the reason).

Also here: filters (method, model, since), `diff` (config and metric differences of two runs) and `rm`,
which deletes only run folders directly inside the runs directory (symlinks resolved first).
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import yaml

from .errors import UserError
from .io import dir_bytes, read_json_object
from .training.checkpoint_dirs import latest_checkpoint
from .training.lock import is_locked
from .training.run_dir import FAILURE_FILE, PARENT_FILE
from .yamlio import flatten_dotted, read_yaml


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


def _config(run: Path) -> dict:
    try:
        config = read_yaml((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_fields(run: Path) -> dict:
    config = _config(run)
    return {k: config.get(k) for k in ("method", "model")}


# the hyperparameters the table shows (dotted config keys)
KEY_HYPERPARAMETERS = ("train.lr", "train.batch_size", "train.grad_accum", "train.max_steps", "train.epochs", "lora.r")


def _parent(run: Path, config: dict, summary: dict) -> str | None:
    """Where a run came from: the sweep that started it (RUN/parent.json), the run it was distilled/exported from
    (its summary says), or itself when resumed."""
    if (run / PARENT_FILE).exists():
        try:
            started_by = read_json_object(run / PARENT_FILE)
        except UserError:
            started_by = {}
        if isinstance(started_by.get("parent"), str):
            trial = started_by.get("trial")
            return started_by["parent"] + (f" (trial {trial})" if isinstance(trial, int) else "")
    for key in ("parent", "teacher", "source_run"):
        if isinstance(summary.get(key), str):
            return summary[key]
    if (run / "resumes.jsonl").exists():
        return f"{run.name} (resumed)"
    return None


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "config.yaml").exists() or (path / "summary.json").exists())


def list_runs(root="runs") -> list[dict]:
    """One row per run folder (a folder holding config.yaml or summary.json) under `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [run_row(run) for run in sorted(p for p in root.iterdir() if is_run_folder(p))]


def run_row(run: Path) -> dict:
    """The registry's row of one run folder: status, what it trains, its key numbers (None where unknown)."""
    status, s, detail = run_status(run)
    if not s.get("method"):  # not finished (or an empty summary): the config still says what it trains
        s = {**_config_fields(run), **s}
    evals = s.get("eval") if isinstance(s.get("eval"), dict) else {}
    config = flatten_dotted(_config(run))
    when = (run / "config.yaml") if (run / "config.yaml").exists() else (run / "summary.json")
    metric = _text(config.get("train.metric_for_best")) or "eval_loss"
    return {
        "run": run.name,
        "date": datetime.datetime.fromtimestamp(when.stat().st_mtime).isoformat(timespec="seconds"),
        "status": status,
        "method": _text(s.get("method")),
        "model": _text(s.get("model")),
        "hyperparameters": {k: config[k] for k in KEY_HYPERPARAMETERS if config.get(k) is not None},
        "final_train_loss": _number(s.get("final_train_loss")),
        "eval_loss": _number(evals.get("eval_loss")),
        "metric_for_best": metric,
        "eval_metric": _number(evals.get(metric)),  # the saved artifact's (the best step's with eval_every)
        "steps": _number(s.get("steps")),
        "peak_mem_bytes": _number(s.get("peak_mem_bytes")),
        "train_tokens_per_s": _number(s.get("train_tokens_per_s")),
        "artifact_bytes": _number(s.get("artifact_bytes")),
        "config_hash": _text(s.get("config_hash")),
        "parent": _parent(run, config, s),
        "disk_bytes": dir_bytes(run),
        # a finished run that stopped early says why (early stopping, pruned by its sweep)
        "detail": detail or _text(s.get("stop_reason")) or "",
    }


def filter_runs(rows: list[dict], method=None, model=None, since=None) -> list[dict]:
    """Rows of that method / model (a substring of the model name) / started on or after `since` (YYYY-MM-DD)."""
    if since is not None:
        try:
            since = datetime.date.fromisoformat(since).isoformat()
        except ValueError:
            raise UserError(f"--since {since!r}: not a date (YYYY-MM-DD)") from None
    return [
        r
        for r in rows
        if (method is None or r["method"] == method)
        and (model is None or model in (r["model"] or ""))
        and (since is None or r["date"][:10] >= since)
    ]


def find_run(root, name: str) -> Path:
    """A run folder named `name` directly inside `root` (or a path to one there)."""
    root = Path(root).resolve()
    path = Path(name)
    candidate = (path if path.is_absolute() or path.parent != Path(".") else root / name).resolve()
    if candidate.parent != root:
        raise UserError(f"{name}: not a run folder inside the runs directory {root}")
    if not candidate.is_dir() or not ((candidate / "config.yaml").exists() or (candidate / "summary.json").exists()):
        raise UserError(f"{name}: no run folder of that name under {root} (see `tunelab runs {root}`)")
    return candidate


def diff_runs(root, run_a: str, run_b: str) -> dict:
    """Config keys and summary metrics that differ between two runs: {key: [a, b]}."""
    return diff_run_folders([find_run(root, run_a), find_run(root, run_b)])


def diff_run_folders(runs: list[Path]) -> dict:
    """Config keys and summary metrics that are not the same in all `runs`: {key: [value in each run]}."""
    out = {}
    for kind, read in (("config", lambda r: flatten_dotted(_config(r))), ("metrics", _metrics)):
        values = [read(run) for run in runs]
        keys = sorted(set().union(*values))
        out[kind] = {k: [v.get(k) for v in values] for k in keys if any(v.get(k) != values[0].get(k) for v in values)}
    out["runs"] = [run.name for run in runs]
    return out


def _metrics(run: Path) -> dict:
    try:
        s = read_json_object(run / "summary.json")
    except UserError:
        return {}
    flat = flatten_dotted({k: v for k, v in s.items() if k not in ("versions", "hints", "resumes")})
    return {k: v for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def remove_runs(root, names: list[str]) -> list[Path]:
    """Delete run folders inside `root`; refuses anything else (a path outside, the folder itself, a running run).
    Every name is checked before anything is deleted."""
    runs = [find_run(root, name) for name in names]
    for run in runs:
        if is_locked(run):
            raise UserError(f"{run.name}: a process is training it; stop it first")
    for run in runs:
        shutil.rmtree(run)
    return runs
