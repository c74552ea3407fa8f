"""`tunelab sweep CONFIG.yaml --space SPACE.yaml --trials N`: Optuna search over config values.

Every trial is an ordinary run in the config's out_dir (RUN/parent.json names the sweep); the study lives
in OUT_DIR/NAME/study.db, so running the same command again continues it up to N trials. Trial 0 is the
config as written (when its values lie in the space). A run's periodic evaluation (train.eval_every) feeds
the pruner; a pruned trial stops like early stopping and is recorded as pruned. A failed trial is recorded
with its error and the sweep goes on. --jobs J runs J worker processes on the same study.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..config import load_config
from ..errors import UserError, did_you_mean
from ..eval.metrics import lower_is_better
from ..io import atomic_write_json, atomic_write_text, plain_name_problem
from ..log import log
from ..methods import get_method
from ..training import train
from ..training.lock import RunLock
from ..training.observer import RunObserver
from ..training.run_dir import PARENT_FILE
from ..training.signals import Interrupted
from .report import best_trial, finite, results_table, short_params, state_name, write_plots, write_results
from .space import SearchSpace
from .study import counted, open_study, requeue, requeue_interrupted, running


@dataclass
class SweepOptions:
    config: str
    space: str
    trials: int
    overrides: list[str] = field(default_factory=list)
    metric: str = "eval_loss"
    direction: str | None = None  # min | max; unset: min for losses and perplexities, else max
    jobs: int = 1
    pruner: str = "median"
    name: str | None = None  # the sweep folder inside out_dir; unset: sweep-<config file stem>
    progress: bool = True


class MetricMissing(UserError):
    """The chosen metric is not among a finished trial's evaluation numbers: every trial would miss it."""


class TrialObserver(RunObserver):
    """Names the sweep in the trial's run and reports its periodic evaluations to the pruner."""

    def __init__(self, trial: optuna.Trial, metric: str, parent: str):
        self.trial, self.metric, self.parent = trial, metric, parent
        self.pruned_step = None

    def started(self, run_dir: Path) -> None:
        atomic_write_json(run_dir / PARENT_FILE, {"parent": self.parent, "trial": self.trial.number})
        self.trial.set_user_attr("run", str(run_dir))

    def evaluated(self, step: int, metrics: dict) -> str | None:
        value = metrics.get(self.metric)
        if not finite(value):
            return None
        self.trial.report(float(value), step)
        if not self.trial.should_prune():
            return None
        self.pruned_step = step
        return f"pruned by sweep {self.parent} at step {step} ({self.metric} {value:.5g})"


@dataclass
class Sweep:
    """What every worker needs to run trials (picklable: it crosses into --jobs workers)."""

    options: SweepOptions
    direction: str
    space: SearchSpace
    sweep_dir: Path
    name: str
    base_run_name: str | None
    identity: dict
    seed: int

    def study(self):
        return open_study(
            self.sweep_dir,
            self.name,
            self.direction,
            self.identity,
            self.seed,
            self.options.trials,
            self.options.pruner,
        )


def trial_metric(run_dir: Path, summary: dict, metric: str, progress: bool) -> float:
    """The metric of a finished trial: its final evaluation, or `tunelab eval`'s (generation metrics)."""
    evals = summary.get("eval") or {}
    if metric not in evals and summary.get("method") is not None:
        from ..eval.run import evaluate_run

        evals = evaluate_run(str(run_dir), progress=progress)
    value = evals.get(metric)
    if not finite(value):
        numbers = sorted(k for k, v in evals.items() if finite(v) and k.startswith("eval_"))
        raise MetricMissing(
            f"--metric {metric}: the trial's evaluation has no such number{did_you_mean(metric, numbers)}; "
            f"it has: {', '.join(numbers)}"
        )
    return float(value)


def run_trial(sweep: Sweep, study, trial: optuna.Trial) -> None:
    """Train one trial and tell the study how it ended (complete, pruned or failed)."""
    opts = sweep.options
    t0 = time.perf_counter()
    observer = TrialObserver(trial, opts.metric, sweep.name)
    try:
        data = sweep.space.config(sweep.space.suggest(trial))
        data["run_name"] = f"{sweep.name}-t{trial.number:03d}"
        result = train(data, progress=opts.progress, observer=observer)
        value = (
            None
            if observer.pruned_step is not None
            else trial_metric(result.run_dir, result.summary, opts.metric, opts.progress)
        )
    except Interrupted:
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        requeue(study, study.get_trials(deepcopy=False)[trial.number])
        raise
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded and the sweep goes on
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("error", " ".join(message.split())[:500])
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(exc, MetricMissing):
            raise
        return
    trial.set_user_attr("seconds", time.perf_counter() - t0)
    if value is None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value)


def _eta(seconds: list[float], remaining: int, jobs: int) -> str:
    if not seconds or remaining <= 0:
        return "-"
    left = statistics.fmean(seconds) * math.ceil(remaining / jobs)
    return f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f}s"


def progress_line(sweep: Sweep, study, number: int, seconds: list[float]) -> str:
    t = study.get_trials(deepcopy=False)[number]
    opts, best = sweep.options, best_trial(study)
    score = f"{opts.metric} {t.value:.5g}" if t.value is not None else (t.user_attrs.get("error") or "")[:160]
    if t.state == TrialState.PRUNED:
        score += f" at step {t.last_step}"
    done = counted(study)
    return (
        f"sweep: trial {done}/{opts.trials} (#{t.number}) {short_params(t.params)}: {state_name(t)} {score}; "
        f"{t.user_attrs.get('seconds', 0):.0f}s"
        + (f"; best {best.value:.5g} (#{best.number})" if best else "")
        + f"; ETA {_eta(seconds, opts.trials - done, opts.jobs)}"
    )


def run_trials(sweep: Sweep, study) -> None:
    """Ask, train, tell until the study has --trials trials that ran to an end (or another worker takes the last)."""
    seconds: list[float] = []
    while counted(study) + running(study) < sweep.options.trials:
        trial = study.ask()
        run_trial(sweep, study, trial)
        seconds.append(study.get_trials(deepcopy=False)[trial.number].user_attrs.get("seconds", 0.0))
        log(progress_line(sweep, study, trial.number, seconds))
        write_results(
            study,
            sweep.sweep_dir,
            sweep.space,
            sweep.options.metric,
            sweep.direction,
            sweep.options.trials,
            sweep.base_run_name,
        )


def _worker(sweep: Sweep, index: int) -> None:
    """One of --jobs processes (forked: it shares the sweep's lock, so no one takes the study over meanwhile)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sweep.options.jobs))
    sweep.seed += 7919 * (index + 1)  # each worker's sampler draws its own random points
    try:
        run_trials(sweep, sweep.study())
    except Interrupted as stop:
        os._exit(stop.exit_code)
    except UserError as exc:
        log(f"error: {exc}")
        os._exit(2)
    os._exit(0)


def _run_workers(sweep: Sweep) -> None:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(sweep, i)) for i in range(sweep.options.jobs)]
    for w in workers:
        w.start()
    # a SIGTERM to the sweep reaches its workers (each checkpoints its trial); Ctrl-C reaches the group itself
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: [os.kill(w.pid, signum) for w in workers])
    try:
        for w in workers:
            while w.is_alive():
                try:
                    w.join()
                except KeyboardInterrupt:
                    continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes = [w.exitcode for w in workers]
    if any(codes):
        raise UserError(f"sweep workers stopped with exit codes {codes} (see their messages above)")


def prepare(options: SweepOptions) -> Sweep:
    if options.trials < 1:
        raise UserError(f"--trials must be >= 1, got {options.trials}")
    if options.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {options.jobs}")
    cfg = load_config(options.config, options.overrides)
    if not cfg.data.train:
        raise UserError(f"{options.config}: data.train is not set: a sweep trains on it")
    if not cfg.data.eval and cfg.data.val_fraction == 0:
        raise UserError("a sweep scores its trials on validation data: set data.eval, or data.val_fraction > 0")
    direction = options.direction or ("min" if lower_is_better(options.metric) else "max")
    if direction not in ("min", "max"):
        raise UserError(f"--direction {direction!r}: choose min or max")
    name = options.name or f"sweep-{Path(options.config).stem}"
    problem = plain_name_problem(name)
    if problem:
        raise UserError(f"--name {name!r} must be a plain folder name inside out_dir: {problem}")
    base = cfg.to_dict()
    space = SearchSpace(options.space, base)
    # the config's identity is what the user set (defaults left out), so a newer tunelab that adds fields with
    # defaults still continues the study
    given = cfg.model_dump(mode="json", exclude_defaults=True)
    given_hash = hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest()[:12]
    identity = {"metric": options.metric, "direction": direction, "space": space.describe(), "config": given_hash}
    sweep_dir = Path(cfg.out_dir).expanduser() / name
    return Sweep(options, direction, space, sweep_dir, name, cfg.run_name, identity, cfg.seed)


def run_sweep(options: SweepOptions) -> dict:
    """Run (or continue) the sweep; returns the summary written to SWEEP/sweep.json."""
    sweep = prepare(options)
    try:
        sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{sweep.sweep_dir}: cannot create the sweep folder: {exc.strerror or exc}") from None
    try:
        lock = RunLock(sweep.sweep_dir).acquire()
    except UserError:
        raise UserError(f"{sweep.sweep_dir}: another process is running this sweep; wait for it or stop it") from None
    try:
        study = sweep.study()
        atomic_write_text(sweep.sweep_dir / "space.yaml", sweep.space.path.read_text(encoding="utf-8-sig"))
        _start(sweep, study)
        if options.jobs == 1:
            run_trials(sweep, study)
        else:
            _run_workers(sweep)
        summary = write_results(
            study, sweep.sweep_dir, sweep.space, options.metric, sweep.direction, options.trials, sweep.base_run_name
        )
        log(results_table(study, options.metric))
        summary["plots"] = [str(p) for p in write_plots(study, sweep.sweep_dir, options.metric)]
        atomic_write_json(sweep.sweep_dir / "sweep.json", summary)
    finally:
        lock.release()
    if summary["best"] is None:
        first = summary["failed"][0]["error"] if summary["failed"] else "none finished"
        raise UserError(f"sweep {sweep.name}: no trial completed ({first}); results in {sweep.sweep_dir}")
    return summary | {"sweep_dir": str(sweep.sweep_dir)}


def _start(sweep: Sweep, study) -> None:
    """Notes, interrupted trials queued again, and (for a new study) the config as written as trial 0."""
    for number in requeue_interrupted(study):
        log(f"sweep: trial {number} was interrupted (the sweep stopped); its values run again")
    done = counted(study)
    if done:
        log(f"sweep: continuing {sweep.name}: {done} of {sweep.options.trials} trials already ran")
    elif not study.trials:
        base = sweep.space.base
        params, why = sweep.space.baseline(get_method(base["method"]).default_lr)
        if params is None:
            log(f"note: {why}: the sweep is not compared with your config as written")
        else:
            study.enqueue_trial(params, user_attrs={"baseline": True})
    cfg_eval_every = sweep.space.base["train"].get("eval_every")
    if (
        sweep.options.pruner != "none"
        and cfg_eval_every is None
        and "train.eval_every" not in sweep.space.distributions
    ):
        log("note: train.eval_every is unset: trials are evaluated only at the end, so none can be pruned")
