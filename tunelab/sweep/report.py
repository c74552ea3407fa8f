"""What a sweep leaves in its folder: results.csv (every trial), sweep.json (the summary), best.yaml (the best
trial's whole config, ready for `tunelab train`) and plots/ (Optuna's own matplotlib plots)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..config import build_config
from ..eval.plots import _pyplot, _save
from ..io import atomic_write_json, atomic_write_text
from ..log import log
from .study import interrupted

BEST_FILE = "best.yaml"
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "sweep.json"


def state_name(trial: optuna.trial.FrozenTrial) -> str:
    return "interrupted" if interrupted(trial) else trial.state.name.lower()


def short_params(params: dict) -> str:
    """`lr=0.0032 r=16`: the last part of each key, floats to 3 significant digits."""
    return " ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in params.items()
    )


def best_trial(study) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return study.best_trial if complete else None


def results_table(study, metric: str) -> str:
    """One line per trial: number, state, metric, last evaluated step, seconds, values, run or error."""
    lines = [f"{'trial':>5s} {'state':11s} {metric:>14s} {'step':>5s} {'seconds':>7s}  values / run"]
    for t in study.get_trials(deepcopy=False):
        value = f"{t.value:.5g}" if t.value is not None else "-"
        step = str(t.last_step) if t.last_step is not None else "-"
        seconds = f"{t.user_attrs['seconds']:.0f}" if "seconds" in t.user_attrs else "-"
        tail = t.user_attrs.get("error") or t.user_attrs.get("run", "")
        tags = " (your config)" if t.user_attrs.get("baseline") else ""
        lines.append(
            f"{t.number:>5d} {state_name(t):11s} {value:>14s} {step:>5s} {seconds:>7s}  {short_params(t.params)}{tags}"
            + (f"  {tail}" if tail else "")
        )
    return "\n".join(lines)


def _trial_row(t) -> dict:
    return {
        "trial": t.number,
        "state": state_name(t),
        "value": t.value,
        "params": t.params,
        "run": t.user_attrs.get("run"),
        "last_step": t.last_step,
    }


def write_results(study, sweep_dir: Path, space, metric: str, direction: str, trials: int, base_run_name) -> dict:
    """results.csv, best.yaml (once a trial completed) and sweep.json; returns the summary written."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    if len(frame):
        frame["state"] = [state_name(t) for t in study.get_trials(deepcopy=False)]
    atomic_write_text(sweep_dir / RESULTS_FILE, frame.to_csv(index=False))
    all_trials = study.get_trials(deepcopy=False)
    states: dict = {}
    for t in all_trials:
        states[state_name(t)] = states.get(state_name(t), 0) + 1
    best = best_trial(study)
    baseline = next((t for t in all_trials if t.user_attrs.get("baseline") and not interrupted(t)), None)
    summary = {
        "study": study.study_name,
        "metric": metric,
        "direction": direction,
        "trials": trials,
        "states": states,
        "best": _trial_row(best) if best else None,
        "baseline": _trial_row(baseline) if baseline else None,
        "pruned": [{"trial": t.number, "step": t.last_step} for t in all_trials if t.state == TrialState.PRUNED],
        "failed": [{"trial": t.number, "error": t.user_attrs["error"]} for t in all_trials if "error" in t.user_attrs],
    }
    if best is not None:
        data = space.config(best.params)
        data["run_name"] = base_run_name
        for key in ("train", "eval"):  # as the trials read them (from the sweep's working folder)
            if data["data"].get(key):
                data["data"][key] = str(Path(data["data"][key]).resolve())
        text = build_config(data).to_yaml()
        header = f"# best trial {best.number} of sweep {study.study_name}: {metric} {best.value:.6g}\n"
        atomic_write_text(sweep_dir / BEST_FILE, header + text)
    atomic_write_json(sweep_dir / SUMMARY_FILE, summary)
    return summary


PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "slice": optuna.visualization.matplotlib.plot_slice,
}


def write_plots(study, sweep_dir: Path, metric: str) -> list[Path]:
    """plots/NAME.png for each of PLOTS that the trials allow (importances need two complete trials and a
    parameter that varies); a plot that cannot be drawn is a note, not an error."""
    _pyplot()  # Agg
    written = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for name, plot in PLOTS.items():
        if name != "intermediate_values" and not complete:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # a parameter with one value so far: a flat axis
                axes = plot(study, target_name=metric) if name != "intermediate_values" else plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log(f"note: sweep plot {name} not drawn: {exc}")
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        fig = first.figure
        written.append(_save(fig, sweep_dir / "plots" / f"{name}.png"))
    return written


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
