"""The sweep's Optuna study, kept in SWEEP/study.db (SQLite): opened again, it continues where it stopped.

A trial left RUNNING by a killed sweep is closed as FAIL without an `error` (interrupted) and its values are
queued again; it does not count towards --trials. Failed trials (an `error`), pruned and complete ones do.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..errors import UserError

STUDY_FILE = "study.db"
PRUNERS = ("median", "hyperband", "none")
# the first trials run to the end whatever they score: the pruner needs something to compare with
PRUNER_STARTUP_TRIALS = 2


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)
    if name == "hyperband":  # resource = optimizer steps; max from the first finished trial
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner {name!r}: choose from {', '.join(PRUNERS)}")


def make_sampler(seed: int, trials: int, done: int) -> optuna.samplers.TPESampler:
    """TPE after a few random trials (Optuna's default of 10 would leave a small sweep all random); the seed
    moves on with the trials already run, so a resumed sweep does not draw its first points again."""
    return optuna.samplers.TPESampler(n_startup_trials=min(10, max(3, trials // 3)), seed=seed + done)


def open_storage(path: Path, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study's SQLite storage. Two processes opening a new file at once (--jobs workers, or a reader) race to
    create its tables, and the loser gets "table ... already exists": it opens again, the tables now exist."""
    import sqlalchemy.exc

    for attempt in range(1, attempts):
        try:
            return _storage(path)
        except sqlalchemy.exc.OperationalError:
            time.sleep(0.2 * attempt)
    return _storage(path)  # the last attempt raises what it meets


def _storage(path: Path) -> optuna.storages.RDBStorage:
    # parallel workers wait for each other's writes
    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}})


def open_study(sweep_dir: Path, name: str, direction: str, identity: dict, seed: int, trials: int, pruner: str):
    """Create or reopen the study; `identity` (metric, direction, space, config hash) must match a stored one."""
    optuna.logging.set_verbosity(logging.WARNING)  # the sweep prints its own line per trial
    storage = open_storage(Path(sweep_dir).resolve() / STUDY_FILE)
    existing = [s.study_name for s in optuna.study.get_all_study_summaries(storage)]
    done = 0
    if name in existing:
        stored = optuna.load_study(study_name=name, storage=storage)
        changed = [key for key in identity if stored.user_attrs.get(key) != identity[key]]
        if changed:
            raise UserError(
                f"{sweep_dir}: this sweep's study was run with another {', '.join(changed)}; "
                "keep them to continue it, or start a new sweep (--name NAME, or delete the folder)"
            )
        done = len(stored.trials)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="minimize" if direction == "min" else "maximize",
        sampler=make_sampler(seed, trials, done),
        pruner=make_pruner(pruner),
        load_if_exists=True,
    )
    if name not in existing:
        for key, value in identity.items():
            study.set_user_attr(key, value)
    return study


def interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def counted(study) -> int:
    """Trials that ran to an end: complete, pruned, or failed with an error (not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not interrupted(t))


def running(study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def requeue(study, trial: optuna.trial.FrozenTrial) -> None:
    """Close a trial that was stopped (a signal, a killed sweep) as interrupted and queue its values to run again."""
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    kept = {k: v for k, v in trial.user_attrs.items() if k == "baseline"}
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **kept})


def requeue_interrupted(study) -> list[int]:
    """Trials a killed sweep left RUNNING (the caller holds the sweep's lock: no live process owns them)
    requeued; returns their numbers."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        requeue(study, trial)
    return [t.number for t in stale]
