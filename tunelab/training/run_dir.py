"""The run directory: naming, creation, metrics log, versions, and the saved artifact."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..config import plain_name_problem
from ..errors import UserError
from ..io import atomic_write_text


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


def create_run_dir(cfg) -> Path:
    """A new, unique run folder under cfg.out_dir (a suffix is added if the name is taken)."""
    out = Path(cfg.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.run_name or default_run_name(cfg)
    path = safe_child(out, name)
    n = 2
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path = safe_child(out, f"{name}-{n}")
            n += 1


def save_artifact(method, model, run_dir: Path, tokenizer=None) -> Path:
    """Save the method's artifact (adapter/ or model/) atomically: temp folder, then rename.
    A full model directory also gets the tokenizer, so it loads on its own."""
    final = run_dir / method.artifact
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{method.artifact}."))
    try:
        method.save(model, tmp)
        if method.artifact == "model" and tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class MetricsLog:
    """Appends one JSON object per logging step to metrics.jsonl (and mirrors scalars to TensorBoard)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=(resume_step + 1) if resume_step else None)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def versions() -> dict:
    import peft
    import torch
    import transformers

    from .. import __version__

    return {
        "tunelab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
