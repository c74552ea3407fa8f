"""Step time and peak memory measured on shallow copies of the run: the run's own config, data, method and
precision, trained for a few steps by tunelab's loop (each in its own process) on its architecture cut to 8 and
16 blocks (random weights, full width and vocabulary; a shallower model: its own depth and half of it), then
extrapolated to the real depth: seconds per step = fixed + per_block x blocks, and so the peak RSS of loading
and of training (on a CPU).

Every cost of a step is in the measurement (the matmuls at the run's real shapes, attention, the loss, the
frozen-weight casts, the optimizer, Python), not a FLOP count over a peak rate: that model was 55-93% low on
small models on a CPU (README). The times come from one more process that steps both copies by turns on the
same data windows (paired.py: a shared machine's phases of speed then move both alike), and the per-block
time is the median of those pairs' differences. Memory comes from each copy's own process (its peak RSS is its
own, as the real run's is): what the allocator keeps, peft's own buffers and the loss's temporaries are in the
copies' peaks, where the per-token model of memory.py missed up to 35% at smollm2's width. Cached per machine
and config; a model whose 16-block copy would be too large to train here falls back to FLOPs + overhead and
the memory model alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .cache import cached

DEEPEST = 16  # the deeper copy; the shallower has half its blocks: their distance divides the timing noise
COPY_STEPS = 6  # the run's first steps: each copy's own process trains these windows (their peak RSS)
# a copy's training peak, where the run keeps its freed memory (device.keep_freed_memory: full and freeze on a
# CPU), is the median of this many processes: the kept heap of smollm2 full 2 x 64's copies peaked at 1,741-1,848
# MiB (8 blocks) and 2,076-2,343 (16) in identical processes, 3,396 to 2,475 MiB extrapolated to 30 blocks, where
# the real run peaked at 2,957-2,975 in three; without the setting each copy's peak repeated to the MiB
KEPT_PEAK_RUNS = 3
MAX_PARAMS = 400_000_000  # the deeper copy (weights, embeddings, head): above it, no calibration
VOLATILE = {"out_dir", "run_name"}
# in the cache key: a calibration taken another way is redone (1: each copy timed in its own process; 2: by turns
# of one step each; 3: by bursts of short steps; 4: the copies keep their freed memory, as training now does;
# 5: prompt learning's loss runs the LM head on label positions only, as the others' does; 6: a kept-memory run's
# copies peak-measured KEPT_PEAK_RUNS times)
METHOD_VERSION = 6
VOLATILE_TRAIN = {"max_steps", "epochs", "eval_every", "save_every", "log_every", "save_total_limit"}


def copy_depths(layers: int) -> tuple[int, int]:
    """DEEPEST blocks (the model's own depth when it is shallower) and half as many. The real depth's time is
    extrapolated from their difference, so the noise of each copy's timing is multiplied by about
    (layers - lo) / (hi - lo): with 1 and 4 blocks and smollm2's 30, 10-fold (one cell 39% low, another 69%
    high); with 1 and 8, 4-fold (6 of 36 cells outside 25% on an AMD EPYC, up to +75%; the 1- to 8-block
    slope of one cell read 0.026 and 0.037 s a block in two runs, where 8 to 30 blocks read 0.034 in both);
    with 8 and 16, under 2-fold."""
    hi = max(2, min(DEEPEST, layers))
    return max(1, hi // 2), hi


def copy_params(shape, counts, blocks: int) -> int:
    """Parameters of the architecture cut to `blocks` blocks (the method's additions left out)."""
    per_block = (counts.total - counts.embedding - _head(shape)) / max(shape.layers, 1)
    return int(counts.embedding + _head(shape) + per_block * blocks)


def _head(shape) -> int:
    return 0 if shape.tied else shape.vocab * shape.hidden


def _cut(config, blocks: int):
    small = config.__class__.from_dict(config.to_dict())
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    text.num_hidden_layers = blocks
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:blocks]
    return small


def _write_copy(cfg, config, tokenizer, blocks: int, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    small = _cut(config, blocks)
    torch.manual_seed(0)
    if cfg.task == "classification":
        small.num_labels = len(cfg.data.labels or ["a", "b"])
        model = AutoModelForSequenceClassification.from_config(small)
    else:
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _copy_config(cfg, folder: Path, out: Path, steps: int) -> Path:
    """`cfg` on the model in `folder`, for `steps` steps, saved under `out`: its path."""
    d = cfg.to_dict()
    # TensorBoard as the run has it: its writer thread costs a short step 5-15 ms (tiny-llama at 2 x 64: 0.033 s a
    # step without it, 0.042-0.058 with it); MLflow and W&B are not told of the copies
    report_to = [tracker for tracker in cfg.report_to if tracker == "tensorboard"]
    d.update(model=str(folder), out_dir=str(out), run_name=folder.name, report_to=report_to)
    d.pop("mlflow", None)
    d.pop("wandb", None)
    d["train"] = dict(d["train"], max_steps=steps, eval_every=None, save_every=None, log_every=1)
    d["train"]["early_stopping_patience"] = None
    path = out / f"{folder.name}-{steps}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d), encoding="utf-8")  # JSON is YAML
    return path


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["the run failed"])[-1])
    return proc.stdout


def _copy_run(cfg, folder: Path, out: Path) -> dict:
    """COPY_STEPS steps of `cfg` on the model in `folder`, in its own process (its RSS is its own, as the real
    run's is): the peak RSS of its load and of its training (summary.json; None where the peak cannot be reset)."""
    path = _copy_config(cfg, folder, out, COPY_STEPS)
    _run([sys.executable, "-m", "tunelab", "train", str(path), "--no-progress"])
    summary = json.loads((out / folder.name / "summary.json").read_text(encoding="utf-8"))
    return {"load_peak": summary.get("load_peak_mem_bytes"), "train_peak": summary.get("train_peak_mem_bytes")}


def _paired_run(cfg, folders: list[Path], out: Path) -> dict:
    """Both copies' step times, taken by turns in one process (paired.py): {'lo': [...], 'hi': [...]}."""
    from .paired import MAX_BURST, MAX_PAIRS, WARMUP

    steps = WARMUP + MAX_PAIRS * MAX_BURST  # the copies' schedules (warm-up, decay) cover every step they may take
    paths = [str(_copy_config(cfg, folder, out / "paired", steps)) for folder in folders]
    return json.loads(_run([sys.executable, "-m", "tunelab.estimate.paired", *paths]).strip().splitlines()[-1])


def _key(cfg, config) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE}
    d["train"] = {k: v for k, v in d["train"].items() if k not in VOLATILE_TRAIN}
    data = Path(cfg.data.train)
    stat = data.stat()
    blob = json.dumps(
        [METHOD_VERSION, d, config.to_dict(), str(data), stat.st_size, stat.st_mtime_ns], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def depth_calibration(cfg, get_config, shape, counts, kept_memory: bool = False) -> tuple[dict | None, str]:
    """({'fixed_s', 'per_block_s', 'depths', 'timed_steps'} per optimizer step, note); (None, why) when the
    run cannot be calibrated so (no data file, a distillation, a copy too large to train here).
    `get_config()`: the architecture's transformers config. `kept_memory`: the run keeps its freed memory (its
    copies' training peaks are the median of KEPT_PEAK_RUNS processes)."""
    if not cfg.data.train or not Path(cfg.data.train).exists():
        return None, "no data file to time real steps on"
    if cfg.distill is not None:
        return None, "a distillation run (its teacher is not cut)"
    depths = copy_depths(shape.layers)
    size = copy_params(shape, counts, depths[-1])
    if size > MAX_PARAMS:
        return None, f"its {depths[-1]}-block copy has {size / 1e6:.0f}M parameters, too many to time here"
    config = get_config()

    def measure() -> dict:
        from ..log import log
        from ..models import load_tokenizer

        log(
            f"estimate: timing {cfg.method} on {' and '.join(map(str, depths))}-block copies of {cfg.model} "
            "(once per machine and config)"
        )
        runs, tokenizer = {}, load_tokenizer(cfg.model, cfg.trust_remote_code)
        with tempfile.TemporaryDirectory(prefix="tunelab-depth-") as tmp:
            folders = [Path(tmp) / f"blocks-{blocks}" for blocks in depths]
            for blocks, folder in zip(depths, folders):
                with contextlib.redirect_stderr(io.StringIO()):
                    _write_copy(cfg, config, tokenizer, blocks, folder)
                runs[blocks] = _copy_run(cfg, folder, Path(tmp) / "runs")
                if kept_memory:
                    peaks = [runs[blocks]["train_peak"]]
                    peaks += [
                        _copy_run(cfg, folder, Path(tmp) / f"peak-{i}")["train_peak"] for i in range(1, KEPT_PEAK_RUNS)
                    ]
                    if all(isinstance(p, int) for p in peaks):
                        runs[blocks]["train_peak"] = int(statistics.median(peaks))
            if _load_decides(runs, depths, shape.layers):
                # the load's peak would set the estimate, and it moves between identical processes (a 16-block
                # 4-bit copy's: 740-1,002 MiB, what the allocator still holds when loading ends): extrapolated
                # over 30 blocks one high reading is 2.75-fold; each copy loads once more, its lower peak taken
                for blocks, folder in zip(depths, folders):
                    again = _copy_run(cfg, folder, Path(tmp) / "again")
                    runs[blocks]["load_peak"] = min(runs[blocks]["load_peak"], again["load_peak"])
            times = _paired_run(cfg, folders, Path(tmp) / "runs")
        out = {"depths": list(depths), **fit_depth(times["lo"], times["hi"], *depths)}
        for kind in ("load_peak", "train_peak"):  # bytes at each depth, when the copies' peaks were measured
            out[f"{kind}_bytes"] = _peaks(runs, depths, kind)
        return out

    return cached("copies", _key(cfg, config), measure, timing=True), "measured"


def _peaks(runs: dict, depths, kind: str) -> list[int] | None:
    values = [runs[blocks][kind] for blocks in depths]
    return values if all(isinstance(v, int) for v in values) else None


def _load_decides(runs: dict, depths, layers: int) -> bool:
    """Whether the copies' load peak, extrapolated to `layers` blocks, is above their training peak."""
    load, train = _peaks(runs, depths, "load_peak"), _peaks(runs, depths, "train_peak")
    if load is None or train is None:
        return False
    return _extrapolate(depths, load, layers) > _extrapolate(depths, train, layers)


def fit_depth(shallow: list[float], deep: list[float], lo: int, hi: int) -> dict:
    """Seconds per step = fixed_s + per_block_s x blocks, from paired steps of the lo- and hi-block copies: the
    median of the pairs' differences per block, and the shallow copy's median time less its blocks."""
    per_block = max(0.0, statistics.median((b - a) / (hi - lo) for a, b in zip(shallow, deep)))
    return {
        "fixed_s": max(0.0, statistics.median(shallow) - per_block * lo),
        "per_block_s": per_block,
        "timed_steps": len(shallow),
        "step_spread": step_spread(shallow, deep),
    }


def step_spread(shallow: list[float], deep: list[float]) -> float:
    """How much this machine moves steps of the same shapes: the interquartile range over the median of the
    deeper copy's time over the shallower one's, pair by pair. A pair ran one data window back to back, so the
    window's shapes move both times alike and their ratio moves with the machine's speed only (a spread over one
    copy's steps would count a long window as noise: a bench-like data file's windows of 555-1,414 tokens read
    208%). The middle half of the pairs, not all of them: one step caught by a phase change is no measure of
    the other 23 (their median is what the estimate takes)."""
    ratios = [b / a for a, b in zip(shallow, deep) if a > 0]
    if len(ratios) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (q3 - q1) / statistics.median(ratios)


def at_depth(calibration: dict, kind: str, blocks: int, min_per_block: float = 0.0) -> float | None:
    """A copies' measurement (`load_peak_bytes`, `train_peak_bytes`) extrapolated linearly to `blocks`, at least
    `min_per_block` bytes a block beyond the deeper copy."""
    values = calibration.get(kind)
    return _extrapolate(calibration["depths"], values, blocks, min_per_block) if values else None


def _extrapolate(depths, values, blocks: int, min_slope: float = 0.0) -> float:
    """The line through (depths[i], values[i]) at `blocks`; where its slope is below `min_slope`, the line of that
    slope through the deeper point. Why a floor: a kept heap's peak moves between identical processes (smollm2 full
    4 x 256 with checkpointing: its copies of 8 and 16 blocks once read 42 MB a block, where the blocks' weights,
    gradients and AdamW moments alone are 57 MB; the other full cells' copies read 55-80 in two matrices), and
    a shallow slope is multiplied by the 14 blocks the extrapolation adds."""
    (lo, hi), (a, b) = depths, values
    slope = (b - a) / (hi - lo)
    if slope < min_slope:
        return b + min_slope * (blocks - hi)
    return a + slope * (blocks - lo)
