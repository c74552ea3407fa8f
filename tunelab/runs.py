"""`tunelab runs`: a table of the runs under a folder."""

from __future__ import annotations

import json
from pathlib import Path


def list_runs(root="runs") -> list[dict]:
    rows = []
    for summary_path in sorted(Path(root).glob("*/summary.json")):
        try:
            s = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        loss = s.get("final_train_loss")
        eval_loss = (s.get("eval") or {}).get("eval_loss")
        rows.append({
            "run": summary_path.parent.name,
            "method": s.get("method"),
            "model": s.get("model"),
            "final_train_loss": round(loss, 4) if isinstance(loss, float) else loss,
            "eval_loss": round(eval_loss, 4) if isinstance(eval_loss, float) else eval_loss,
            "config_hash": s.get("config_hash"),
        })
    return rows
