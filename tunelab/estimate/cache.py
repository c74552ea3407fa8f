"""Per-machine measurements (runtime baseline, matmul speed), cached as JSON under $TUNELAB_HOME/estimate/.

The key includes the CPU/GPU, the thread count and the library versions: another machine or an upgrade
measures again. `TUNELAB_ESTIMATE_NO_CACHE=1` always measures."""

from __future__ import annotations

import hashlib
import json
import os
import platform


def machine_key() -> str:
    import torch

    from ..device import cpu_capability
    from ..reproducible import versions

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    raw = json.dumps(
        [platform.node(), platform.processor(), cpu_capability(), gpu, torch.get_num_threads(), versions()]
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def cached(kind: str, key: str, measure):
    """measure() once per (machine, kind, key); later calls read the cached value."""
    from ..io import atomic_write_json
    from ..models import tunelab_home

    path = tunelab_home() / "estimate" / f"{kind}-{machine_key()}.json"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    if key in table and os.environ.get("TUNELAB_ESTIMATE_NO_CACHE") != "1":
        return table[key]
    table[key] = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, table)
    except OSError:
        pass  # a read-only home: measured again next time
    return table[key]
