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


# a timing taken while other work competes for the CPU is used for this call but not kept: the cache would
# hold a slow machine's figure for every later estimate (seen: 20x apart under a load average of 13 on 2 cores)
BUSY_LOAD_PER_CPU = 1.5


def machine_busy() -> bool:
    """Whether the 1-minute load average is above BUSY_LOAD_PER_CPU per CPU."""
    try:
        return os.getloadavg()[0] > BUSY_LOAD_PER_CPU * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def cached(kind: str, key: str, measure, timing: bool = False):
    """measure() once per (machine, kind, key); later calls read the cached value. A `timing` measured while
    the machine is busy is returned but not stored."""
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
    if timing and machine_busy():
        return table[key]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, table)
    except OSError:
        pass  # a read-only home: measured again next time
    return table[key]
