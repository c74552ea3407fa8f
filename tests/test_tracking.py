"""report_to: the run mirrored to MLflow (a local store, read back through mlflow's own API) and W&B (offline);
a tracker that fails warns once and training goes on."""

import json

import pytest

import tunelab
from tunelab import tracking
from tunelab.config import build_config
from tunelab.errors import ConfigError


def test_mlflow_run_reads_back_with_its_metrics_and_adapter(tiny_config, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from tunelab.training import loop

    monkeypatch.chdir(tmp_path)  # MLflow's own default would put artifacts in ./mlruns of the working folder
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(loop, "write_plots", lambda run_dir: None)  # not under test; most of a short run's time
    tiny_config["report_to"] = ["mlflow"]
    tiny_config["train"]["max_steps"] = 2
    result = tunelab.train(tiny_config, progress=False)
    out_dir = tmp_path / "runs"
    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    assert f"tracking_uri: {uri}" in (result.run_dir / "config.yaml").read_text()  # resolved once, kept
    assert not (tmp_path / "mlruns").exists()

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tunelab"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert json.loads((result.run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    assert run.data.params["train.max_steps"] == "2" and run.data.params["method"] == "lora"
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["step"], r["loss"]) for r in logged
    ]
    assert run.data.metrics["summary.final_train_loss"] == result.summary["final_train_loss"]
    assert run.data.metrics["summary.eval.eval_loss"] == result.summary["eval"]["eval_loss"]

    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "back"))
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "summary.json"):
        source = result.run_dir / name
        assert (tmp_path / "back" / name).read_bytes() == source.read_bytes(), name
    assert str(out_dir / "mlartifacts") in run.info.artifact_uri and local


def test_wandb_is_offline_unless_configured(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):  # nothing into $HOME
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    cfg = build_config({"report_to": ["wandb"], "out_dir": str(tmp_path)})
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    t = tracking.Tracking(cfg, run_dir)
    assert [x.key for x in t.trackers] == ["wandb"], "W&B did not start"
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]["id"]
    t.log({"step": 1, "loss": 2.5, "lr": 0.1})
    t.finish({"steps": 1, "final_train_loss": 2.5}, run_dir / "adapter")
    saved = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0


def test_a_failing_tracker_warns_once_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    calls = []

    class Broken(tracking.Tracker):
        key, name = "mlflow", "MLflow"

        def __init__(self, *args):
            pass

        def log(self, metrics, step):
            raise OSError(28, "No space left on device")

    class Recording(tracking.Tracker):
        key, name = "tensorboard", "TensorBoard"

        def __init__(self, *args):
            pass

        def log(self, metrics, step):
            calls.append((step, metrics))

    monkeypatch.setattr(tracking, "MlflowTracker", Broken)
    monkeypatch.setattr(tracking, "TensorBoardTracker", Recording)
    cfg = build_config({"report_to": ["mlflow", "tensorboard"], "out_dir": str(tmp_path)})
    t = tracking.Tracking(cfg, tmp_path)
    for step in (1, 2, 3):
        t.log({"step": step, "loss": 1.0 / step, "note": "text is not a metric"})
    t.finish({"steps": 3}, None)
    err = capsys.readouterr().err
    assert err.count("warning: MLflow logging stopped (") == 1 and "No space left on device" in err
    assert [s for s, _ in calls] == [1, 2, 3] and calls[0][1] == {"loss": 1.0}


def test_report_to_config(tmp_path):
    assert build_config({}).report_to == ["tensorboard"] and build_config({}).mlflow is None
    assert build_config({"report_to": "mlflow"}).mlflow.experiment == "tunelab"  # one name: a list of one
    with pytest.raises(ConfigError, match=r"report_to\.0: .*\(did you mean 'mlflow'\?\)"):
        build_config({"report_to": ["mlfow"]})
    with pytest.raises(ConfigError, match=r"the 'wandb' section is for report_to: \[wandb\]"):
        build_config({"wandb": {"project": "x"}})
    with pytest.raises(ConfigError, match="each tracker once"):
        build_config({"report_to": ["mlflow", "mlflow"]})


def test_a_missing_tracker_package_is_a_config_error_before_any_work(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"report_to: wandb needs the wandb package: pip install 'tunelab\[tracking\]'"
    ):
        tracking.check_available(["tensorboard", "wandb"])
