"""The run directory: naming, creation, metrics log, and the saved artifact."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_text, normal_modes, plain_name_problem, read_metrics

FAILURE_FILE = "failure.json"  # why a run stopped with an error: {"error", "step"}
PARENT_FILE = "parent.json"  # what started the run, written by it (a sweep): {"parent", ...}


def default_run_name(cfg) -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.model).name)
    return f"{cfg.method}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def safe_child(parent: Path, name: str) -> Path:
    """parent/name, refusing names that would escape the parent folder (config validation already
    refuses such a run_name; this guards every other way a name arrives)."""
    problem = plain_name_problem(name)
    if problem:
        raise UserError(f"run_name {name!r} must be a plain folder name inside out_dir: {problem}")
    return parent / name


def check_out_dir(out_dir) -> None:
    """Fail before any work when out_dir cannot hold run folders: a file in the way, or no write
    permission on the nearest existing folder (read-only filesystems included)."""
    out = Path(out_dir).expanduser()
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"out_dir {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"out_dir {out}: {existing} is not writable")


def create_run_dir(cfg) -> Path:
    """A new, unique run folder under cfg.out_dir (a suffix is added if the name is taken)."""
    out = Path(cfg.out_dir).expanduser()
    check_out_dir(out)
    name = cfg.run_name or default_run_name(cfg)
    path = safe_child(out, name)
    n = 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                path = safe_child(out, f"{name}-{n}")
                n += 1
    except OSError as exc:
        raise UserError(f"out_dir {out}: cannot create the run folder {path.name}: {exc.strerror or exc}") from None


def save_artifact(method, model, run_dir: Path, tokenizer=None) -> Path:
    """Save the method's artifact (adapter/ or model/) atomically: temp folder, then rename.
    A full model directory also gets the tokenizer, so it loads on its own."""
    final = run_dir / method.artifact
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{method.artifact}."))
    try:
        method.save(model, tmp)
        if method.artifact == "model" and tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        normal_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class MetricsLog:
    """Appends one JSON object per logging step to metrics.jsonl, and mirrors its numbers to the run's trackers
    (tunelab.tracking: TensorBoard, MLflow, W&B; a failing one is switched off with a warning).

    On resume the log is cut back to the checkpoint's step (a torn last line is dropped)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tracking=None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tracking = tracking

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tracking is not None:
            self.tracking.log(record)

    def close(self) -> None:
        self.file.close()


def quiet_tensorboard_thread() -> None:
    """TensorBoard writes from a thread that prints its own traceback when a write fails; that
    failure reaches the tracker on the next write and is reported there, once, as one line."""
    if getattr(threading.excepthook, "tunelab_quiet", False):
        return
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.tunelab_quiet = True
    threading.excepthook = hook
