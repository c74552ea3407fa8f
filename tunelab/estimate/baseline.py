"""The runtime baseline of a training process on a CPU: peak RSS before any model memory exists.

A CPU run's measured peak (summary.json peak_mem_bytes, kind rss) is the whole process: Python, torch,
transformers, peft, TensorBoard, matplotlib (the plots) and the tokenizer (SmolLM2's alone is ~170 MB)
come before the first weight. This module measures that in a fresh interpreter doing exactly those
imports and loads, once per machine, model tokenizer and versions (cached under $TUNELAB_HOME/estimate/).
`python -m tunelab.estimate.baseline MODEL [--bnb]` prints the measurement as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys

from ..errors import UserError
from .cache import cached


def _measure(model: str | None, bnb: bool) -> int:
    import tempfile
    from pathlib import Path

    import torch
    from torch.utils.tensorboard import SummaryWriter

    import tunelab.training.loop  # noqa: F401 - everything a run imports
    from tunelab.eval.plots import write_plots
    from tunelab.models import load_tokenizer

    if bnb:
        import bitsandbytes  # noqa: F401
    if model:
        load_tokenizer(model)
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(str(Path(tmp) / "tb"))
        writer.add_scalar("train/loss", 1.0, 1)
        writer.close()
        (Path(tmp) / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
        write_plots(Path(tmp))
    x = torch.randn(64, 64, requires_grad=True)  # autograd's and the matmul kernels' own state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (x @ x).sum().backward()
    from tunelab.device import peak_rss_bytes

    return peak_rss_bytes()


def runtime_baseline(model: str | None, bnb: bool = False) -> int:
    """Peak RSS in bytes of a fresh process that imported and loaded what a run does before its model."""
    from .params import PRESETS

    model = None if model in PRESETS else model

    def measure() -> int:
        if model:  # a first load builds the tokenizer's cache (a GGUF conversion): not in the measured process
            from ..models import load_tokenizer

            load_tokenizer(model)
        cmd = [sys.executable, "-m", "tunelab.estimate.baseline", model or "", *(["--bnb"] if bnb else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise UserError(f"measuring the runtime baseline failed: {proc.stderr.strip().splitlines()[-1:]}")
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["baseline_rss_bytes"])

    return cached("baseline", f"{model}|bnb={bnb}", measure)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    print(json.dumps({"baseline_rss_bytes": _measure(name or None, "--bnb" in sys.argv)}))
