"""Which checkpoints a run folder holds (`checkpoints/step-N/`, complete once its COMPLETE marker is written:
checkpoint.py writes them). Paths only, no torch: `tunelab runs` lists runs with these alone."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete step-N folders, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / MARKER).exists():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_unfinished_run(out_dir) -> Path:
    """The most recently checkpointed run under out_dir that has no summary.json yet."""
    candidates = []
    for run in Path(out_dir).glob("*/checkpoints"):
        ckpt = latest_checkpoint(run)
        if ckpt is not None and not (run.parent / "summary.json").exists():
            candidates.append((ckpt.stat().st_mtime, run.parent))
    if not candidates:
        raise UserError(f"no unfinished run with a checkpoint under {out_dir}; name one: --resume RUN")
    return max(candidates)[1]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None
