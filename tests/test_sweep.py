"""tunelab sweep: trials are runs with the sweep as parent, periodic evaluation prunes bad ones, best.yaml trains,
a killed sweep continues its study, failed trials are recorded, SPACE.yaml errors name their line."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from helpers import toy_rows
from tunelab.cli import main
from tunelab.config import build_config, load_config
from tunelab.runs import list_runs
from tunelab.sweep import SweepOptions, run_sweep
from tunelab.sweep.space import SearchSpace


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def sweep_files(tmp_path):
    """A tiny-llama LoRA config that learns at lr 1e-2 with an evaluation every 2 steps, and a space whose other
    points (lr down to 1e-7) barely move in 4 steps: the pruner has trials worse than the median to stop."""
    rows = toy_rows(40)
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    config = {
        "model": "tiny-llama",
        "out_dir": str(tmp_path / "runs"),
        "data": {"train": str(tmp_path / "toy.jsonl"), "val_fraction": 0.2, "max_length": 64},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "warmup_ratio": 0.0}
        | {"eval_every": 2},
        "lora": {"r": 4},
    }
    _write(tmp_path / "config.yaml", yaml.safe_dump(config))
    _write(tmp_path / "space.yaml", "train.lr: {low: 1e-7, high: 1.0e-2, log: true}\nlora.r: [2, 4]\n")
    return tmp_path


def _study(sweep_dir):
    from tunelab.sweep.study import open_storage  # opening while the sweep creates the file races (it retries)

    return optuna.load_study(study_name=sweep_dir.name, storage=open_storage(sweep_dir / "study.db"))


def test_sweep_prunes_records_parents_and_writes_a_trainable_best(sweep_files, capsys):
    args = ["sweep", str(sweep_files / "config.yaml"), "--space", str(sweep_files / "space.yaml"), "--trials", "4"]
    assert main([*args, "--no-progress"]) == 0
    sweep_dir = sweep_files / "runs" / "sweep-config"
    assert capsys.readouterr().out.strip() == str(sweep_dir / "best.yaml")
    study = _study(sweep_dir)
    trials = study.trials
    states = [t.state for t in trials]
    assert len(trials) == 4 and optuna.trial.TrialState.PRUNED in states
    # trial 0 is the config as written; the best is at least as good
    assert trials[0].params == {"train.lr": 1e-2, "lora.r": 4} and trials[0].user_attrs["baseline"]
    assert study.best_value <= trials[0].value

    pruned = next(t for t in trials if t.state == optuna.trial.TrialState.PRUNED)
    pruned_run = sweep_files / "runs" / f"sweep-config-t{pruned.number:03d}"
    summary = json.loads((pruned_run / "summary.json").read_text())  # a graceful stop: a finished run
    assert summary["steps"] == pruned.last_step < 4 and "pruned" in summary["stop_reason"]
    assert (pruned_run / "adapter").is_dir()
    rows = {r["run"]: r for r in list_runs(sweep_files / "runs")}
    assert {r["parent"] for r in rows.values()} == {f"sweep-config (trial {t.number})" for t in trials}
    assert rows[pruned_run.name]["status"] == "finished" and "pruned" in rows[pruned_run.name]["detail"]

    best = load_config(sweep_dir / "best.yaml")  # a valid config: the best trial's values on the base config
    assert (best.train.lr, best.lora.r) == (study.best_params["train.lr"], study.best_params["lora.r"])
    assert best.run_name is None and best.train.eval_every == 2
    report = json.loads((sweep_dir / "sweep.json").read_text())
    assert report["best"]["trial"] == study.best_trial.number and report["baseline"]["trial"] == 0
    assert {p.split("/")[-1] for p in report["plots"]} >= {"optimization_history.png", "param_importances.png"}
    assert all((sweep_dir / "plots" / p.split("/")[-1]).stat().st_size > 0 for p in report["plots"])
    assert len((sweep_dir / "results.csv").read_text().splitlines()) == 5


def test_killed_sweep_continues_the_same_study(sweep_files):
    """SIGKILL while the second trial trains; the same command continues: that trial runs again, nothing is lost."""
    args = ["sweep", "config.yaml", "--space", "space.yaml", "--trials", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", *args], cwd=sweep_files, env=env, stderr=subprocess.PIPE)
    sweep_dir = sweep_files / "runs" / "sweep-config"
    try:
        # trial 1's run folder appears once trial 0 is told and trial 1 trains: a file check, fast enough to
        # kill inside a 4-step trial on a loaded machine (reading the study each time was not: CI once saw
        # trial 1 finish first)
        while proc.poll() is None and not (sweep_files / "runs" / "sweep-config-t001").exists():
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    killed = _study(sweep_dir).trials[1]
    assert killed.state == optuna.trial.TrialState.RUNNING  # the kill left it so

    first = _study(sweep_dir).trials[0]
    summary = run_sweep(
        SweepOptions(config=str(sweep_files / "config.yaml"), space=str(sweep_files / "space.yaml"), trials=2)
    )
    trials = _study(sweep_dir).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"] and "error" not in trials[1].user_attrs
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == killed.params  # the killed one, again
    assert (trials[0].value, trials[0].params) == (first.value, first.params)  # trial 0 kept, not rerun
    assert summary["states"] == {"complete": 2, "interrupted": 1}
    assert (sweep_dir / "best.yaml").exists()


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, capsys, write_jsonl):
    """prefix prepends virtual tokens, so packing: true fails each trial when it starts (not when the space is read)."""
    data = write_jsonl(toy_rows(20))
    config = {"model": "tiny-llama", "out_dir": str(tmp_path / "runs"), "data": {"train": str(data)}}
    config["train"] = {"max_steps": 2, "packing": True, "precision": "fp32"}
    _write(tmp_path / "config.yaml", yaml.safe_dump(config))
    _write(tmp_path / "space.yaml", "method: [prefix]\nprefix.num_virtual_tokens: [2, 4]\n")
    args = ["sweep", str(tmp_path / "config.yaml"), "--space", str(tmp_path / "space.yaml"), "--trials", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no trial completed (train.packing: true does not work here" in err
    report = json.loads((tmp_path / "runs" / "sweep-config" / "sweep.json").read_text())
    assert [f["trial"] for f in report["failed"]] == [0, 1] and report["states"] == {"fail": 2}
    assert "train.packing" in report["failed"][1]["error"]


@pytest.mark.parametrize(
    "space, message",
    [
        (
            "train.lr: {low: 1e-5, high: 1e-2}\ntrain.lrr: [1, 2]\n",
            "space.yaml:2: unknown key 'train.lrr' (did you mean 'lr'?)",
        ),
        ("train.batch_size: [4, 0]\n", "space.yaml:1: train.batch_size: Input should be greater than or equal to 1"),
        ("train.lr: {low: 1e-2, high: 1e-5}\n", "space.yaml:1: train.lr: low (0.01) must be below high (1e-05)"),
        ("train.lr: {low: 0, high: 1, log: true}\n", "space.yaml:1: train.lr: a log range needs low > 0"),
        ("train.lr: 0.1\n", "space.yaml:1: train.lr: expected a list of choices or {low, high[, log][, step]}"),
        ("method: [lora, lorra]\n", "space.yaml:1: method: unknown method 'lorra' (did you mean 'lora'?)"),
        ("method: [ia3]\nlora.r: [4, 8]\n", "space.yaml:2: method 'ia3' does not read the 'lora' section"),
    ],
)
def test_space_errors_name_the_line(tmp_path, capsys, space, message):
    _write(tmp_path / "config.yaml", "model: tiny-llama\ndata: {train: toy.jsonl}\n")
    _write(tmp_path / "space.yaml", space)
    assert main(["sweep", str(tmp_path / "config.yaml"), "--space", str(tmp_path / "space.yaml"), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_a_trial_of_another_method_keeps_only_its_sections(tmp_path):
    _write(
        tmp_path / "space.yaml", "method: [lora, ia3]\nlora.r: [4, 8]\ntrain.lr: {low: 1e-4, high: 1e-2, log: true}\n"
    )
    base = load_config(None, ["model=tiny-llama", "lora.r=8"]).to_dict()
    space = SearchSpace(tmp_path / "space.yaml", base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {}
    for _ in range(12):
        trial = study.ask()
        params = space.suggest(trial)
        drawn.setdefault(params["method"], params)
        study.tell(trial, 0.0)
    assert set(drawn["ia3"]) == {"method", "train.lr"} and set(drawn["lora"]) == {"method", "lora.r", "train.lr"}
    ia3 = build_config(space.config(drawn["ia3"]))  # the base's lora section dropped, ia3's added
    assert (ia3.method, ia3.lora, ia3.ia3 is not None) == ("ia3", None, True)
    assert build_config(space.config(drawn["lora"])).lora.r == drawn["lora"]["lora.r"]
    # the baseline trial: the config's own values (an unset lr is the method's default)
    assert space.baseline(None) == (None, "the config's train.lr=None is outside the space")
    assert space.baseline(3e-3) == ({"method": "lora", "lora.r": 8, "train.lr": 3e-3}, None)


def test_a_generation_metric_is_scored_by_eval_after_the_trial(sweep_files):
    """eval_exact_match is not in the periodic evaluation: `tunelab eval RUN` scores the finished trial (maximised)."""
    options = SweepOptions(
        config=str(sweep_files / "config.yaml"),
        space=str(sweep_files / "space.yaml"),
        trials=1,
        overrides=["train.max_steps=2", "eval.max_new_tokens=4", "eval.latency_examples=1"],
        metric="eval_exact_match",
        progress=False,
    )
    summary = run_sweep(options)
    study = _study(sweep_files / "runs" / "sweep-config")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and summary["direction"] == "max"
    run_eval = json.loads((sweep_files / "runs" / "sweep-config-t000" / "eval.json").read_text())
    assert study.trials[0].value == run_eval["eval_exact_match"] and run_eval["eval_generated_examples"] > 0
