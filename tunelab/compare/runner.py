"""One training per method, each in its own `tunelab train` process: its own peak RSS, and a crash or an error
stops only that method. A causal LM is then scored in that process as `tunelab eval RUN` scores it (`train
--eval`: exact match, BLEU, ROUGE)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ..config import apply_overrides, build_config
from ..errors import UserError, did_you_mean
from ..io import read_metrics
from ..loading import is_run_dir
from ..methods import get_method

POLL_S = 1.0  # how often the progress bar reads the running method's metrics.jsonl


def split_overrides(overrides: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`key=value` applies to every method, `METHOD:key=value` to that method only."""
    common, own = [], {m: [] for m in methods}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in own:
                raise UserError(f"override {item!r}: {head} is not among --methods{did_you_mean(head, own)}")
            own[head].append(rest)
        else:
            common.append(item)
    return common, own


def skip_reason(cfg, name: str) -> str | None:
    """Why a method does not apply to this config's task (None: it does)."""
    if name == "qlora" and cfg.task != "causal_lm":
        return f"qlora's 4-bit base is for causal LMs (task: {cfg.task})"
    return None


def method_config(cfg, name: str, out_dir: Path, overrides: list[str], eval_every: int | None):
    """The config `name` trains with: the compared config with that method (its sections at their defaults,
    its default lr, unless it is the config's own method), the run under out_dir/runs/NAME, every step
    logged, and its own overrides last."""
    from ..estimate import method_variant

    variant = cfg if name == cfg.method else method_variant(cfg, name)
    d = variant.to_dict()
    d.update(out_dir=str(out_dir / "runs"), run_name=name)
    d["train"] = dict(d["train"], log_every=1)
    if eval_every and not d["train"].get("eval_every"):
        d["train"]["eval_every"] = eval_every
    return build_config(apply_overrides(d, overrides))


def has_validation(cfg) -> bool:
    return bool(cfg.data.eval or cfg.data.val_fraction)


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_bytes().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _error_line(log_text: str) -> str:
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["the process exited without a message"])[-1].removeprefix("error: ")


def _run(cmd: list[str], log_path: Path, on_poll=None) -> tuple[int, str, float]:
    """Run cmd with stderr to log_path; (exit code, stdout, wall seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file)
        out = b""
        while True:
            try:
                out += proc.communicate(timeout=POLL_S)[0] or b""
                break
            except subprocess.TimeoutExpired:
                if on_poll is not None:
                    on_poll()
    return proc.returncode, out.decode("utf-8", "replace"), time.perf_counter() - t0


def train_method(cfg, name: str, out_dir: Path, on_step=None) -> dict:
    """Train one method in a fresh process (and score it); the row of results.json without the prediction."""
    import yaml

    for sub in ("configs", "logs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    path = out_dir / "configs" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    log_path = out_dir / "logs" / f"{name}.log"
    log_path.unlink(missing_ok=True)
    metrics = Path(cfg.out_dir) / name / "metrics.jsonl"
    poll = (lambda: on_step(_last_step(metrics))) if on_step else None
    cmd = [sys.executable, "-m", "tunelab", "train", str(path), "--no-progress"]
    if cfg.task == "causal_lm" and cfg.eval.generate and has_validation(cfg):
        cmd.append("--eval")  # generation metrics in the training's process: no second start and model load
    code, out, wall = _run(cmd, log_path, poll)
    lr = cfg.train.lr or get_method(name).default_lr  # as the run resolves it
    row = {"method": name, "lr": lr, "config": str(path), "log": str(log_path), "wall_s": wall}
    run = Path(cfg.out_dir) / name
    if code != 0:
        error = _error_line(log_path.read_text(encoding="utf-8", errors="replace"))
        if is_run_dir(run):  # trained, then the evaluation failed
            return row | {"run_dir": str(run)} | read_run(run) | {"status": "failed", "error": f"evaluation: {error}"}
        return row | {"status": "failed", "error": error}
    run = Path(out.strip().splitlines()[-1])
    return row | {"run_dir": str(run), "status": "ok"} | read_run(run)


SUMMARY_KEYS = (
    "trainable_params",
    "total_params",
    "trainable_pct",
    "artifact_bytes",
    "steps",
    "peak_mem_bytes",
    "peak_mem_kind",
    "train_tokens",
    "train_tokens_per_s",
    "train_wall_s",
    "energy_kwh",
    "energy_source",
    "final_train_loss",
    "precision",
)


def read_run(run: Path) -> dict:
    """What the report needs from a finished run: summary figures, final metrics, the eval-loss curve."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    row = {k: summary.get(k) for k in SUMMARY_KEYS}
    evals = {}
    if (run / "eval.json").exists():  # `tunelab eval`'s (generation metrics too), else the training's own
        evals = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    row["eval"] = {
        k.removeprefix("eval_"): v
        for k, v in (evals or summary.get("eval") or {}).items()
        if k.startswith("eval_") and isinstance(v, int | float) and not isinstance(v, bool)
    }
    row["curve"] = [
        {"step": r["step"], "tokens_seen": r.get("tokens_seen"), "eval_loss": r["eval_loss"]}
        for r in read_metrics(run / "metrics.jsonl")
        if isinstance(r.get("eval_loss"), int | float)
    ]
    return row
