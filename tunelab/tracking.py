"""Experiment tracking (`report_to`): a run's params, per-step metrics, summary and artifact mirrored to
TensorBoard, MLflow and W&B.

metrics.jsonl is the run's record; a tracker is a mirror of it. One that fails (at start, on a step, at the end)
is switched off with one `warning:` line and training goes on. Only the process that writes the run folder
(rank 0) tracks. A resumed run goes on logging into the same MLflow / W&B run (their ids: RUN/tracking.json).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from .errors import ConfigError
from .io import atomic_write_json, read_json_object
from .log import warn
from .sections import Section

IDS_FILE = "tracking.json"  # the MLflow run id / W&B run id of this run folder, for a resume
_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


class MlflowConfig(Section):
    """Options of report_to: mlflow."""

    tracking_uri: str | None = Field(
        None,
        description="where runs are stored; unset: $MLFLOW_TRACKING_URI, else a SQLite store out_dir/mlflow.db with "
        "artifacts in out_dir/mlartifacts (`mlflow ui --backend-store-uri sqlite:///OUT_DIR/mlflow.db` opens it)",
    )
    experiment: str = Field("tunelab", description="MLflow experiment the run is logged under (created if missing)")
    log_artifact: bool = Field(
        True, description="copy the run's artifact (adapter/ or model/) and summary.json into the MLflow run"
    )


class WandbConfig(Section):
    """Options of report_to: wandb."""

    project: str = Field("tunelab", description="W&B project")
    mode: Literal["offline", "online"] | None = Field(
        None,
        description="unset: $WANDB_MODE, else offline (the run is written to RUN/wandb; `wandb sync` uploads it); "
        "online needs a W&B login",
    )
    log_artifact: bool = Field(True, description="log the run's artifact (adapter/ or model/) as a W&B model artifact")


def check_available(report_to: list[str]) -> None:
    """Before any work: a tracker whose package is missing is a config error, not a warning mid-run."""
    for name in report_to:
        package = _PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to: {name} needs the {package} package: pip install 'tunelab[tracking]' (or {package})"
            )


def default_mlflow_uri(out_dir) -> str:
    """$MLFLOW_TRACKING_URI when set, else a SQLite store in the runs folder (resolved once per run)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out_dir).expanduser().resolve() / 'mlflow.db'}"


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> text (strings as they are, everything else as JSON)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return out


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record, dotted keys; `step` and booleans left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= scalars(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[prefix + key] = float(value)
    return out


class Tracker:
    """One backend. Every method may raise: Tracking turns that into a warning and drops the backend."""

    key = name = ""  # the report_to entry, the name in messages

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, summary: dict, run_dir: Path, artifact: Path | None) -> None:
        pass

    def close(self, status: str) -> None:
        """End without finish(): the run failed or was interrupted (status FAILED / KILLED)."""

    def ids(self) -> dict:
        return {}


class TensorBoardTracker(Tracker):
    key, name = "tensorboard", "TensorBoard"

    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        from .training.run_dir import quiet_tensorboard_thread

        quiet_tensorboard_thread()
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=(resume_step + 1) if resume_step else None)

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}", value, step)

    def finish(self, summary, run_dir, artifact):
        self.writer.close()

    def close(self, status):
        self.writer.close()


class MlflowTracker(Tracker):
    key, name = "mlflow", "MLflow"

    def __init__(self, cfg, run_dir: Path, params: dict[str, str], previous: dict):
        for noisy in ("alembic", "mlflow.store.db.utils"):  # table creation logs INFO lines on every new store
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self.options = cfg.mlflow
        self.uri = uri = self.options.tracking_uri or default_mlflow_uri(cfg.out_dir)
        self.client = MlflowClient(uri)
        if previous.get("run_id") and previous.get("tracking_uri") == uri:  # a resume: the same MLflow run
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.options.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                self.options.experiment, artifact_location=_artifact_root(uri)
            )
        tags = {"tunelab.run_dir": str(run_dir.resolve()), "tunelab.method": cfg.method, "tunelab.model": cfg.model}
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        items = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def ids(self):
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, summary, run_dir, artifact):
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), summary.get("steps", 0)
        numbers = [Metric(f"summary.{k}", v, now, step) for k, v in scalars(summary).items()]
        for start in range(0, len(numbers), 1000):
            self.client.log_batch(self.run_id, metrics=numbers[start : start + 1000])
        if self.options.log_artifact:
            self.client.log_artifact(self.run_id, str(run_dir / "summary.json"))
            self.client.log_artifact(self.run_id, str(run_dir / "config.yaml"))
            if artifact is not None:
                self.client.log_artifacts(self.run_id, str(artifact), artifact.name)
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self, status):
        self.client.set_terminated(self.run_id, status)


def _artifact_root(uri: str) -> str | None:
    """A local SQLite store keeps its artifacts beside it (MLflow's default is ./mlruns of the working folder)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


class WandbTracker(Tracker):
    key, name = "wandb", "W&B"

    def __init__(self, cfg, run_dir: Path, params: dict[str, str], previous: dict):
        import wandb

        self.wandb = wandb
        self.options = cfg.wandb
        mode = self.options.mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=self.options.project,
            name=run_dir.name,
            dir=str(run_dir),
            config=params,
            mode=mode,
            id=previous.get("id"),
            resume="allow" if previous.get("id") else None,
            settings=wandb.Settings(console="off", quiet=True, disable_git=True),
        )

    def ids(self):
        return {"id": self.run.id}

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def finish(self, summary, run_dir, artifact):
        self.run.summary.update(scalars(summary))
        if self.options.log_artifact and artifact is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run_dir.name}-{artifact.name}")
            model = self.wandb.Artifact(name, type="model")
            model.add_dir(str(artifact))
            self.run.log_artifact(model)
        self.run.finish()

    def close(self, status):
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Tracking:
    """The run's trackers behind one interface; none of their failures reaches the training loop."""

    def __init__(self, cfg, run_dir: Path, resume_step: int | None = None):
        self.trackers: list[Tracker] = []
        self.run_dir = run_dir
        ids_path = run_dir / IDS_FILE
        previous = read_json_object(ids_path) if resume_step is not None and ids_path.is_file() else {}
        params = flat_params(cfg.to_dict()) if set(cfg.report_to) - {"tensorboard"} else {}
        for key in cfg.report_to:
            cls = {c.key: c for c in (TensorBoardTracker, MlflowTracker, WandbTracker)}[key]
            try:
                if cls is TensorBoardTracker:
                    tracker = cls(run_dir, resume_step)
                else:
                    tracker = cls(cfg, run_dir, params, previous.get(key, {}))
            except Exception as exc:  # noqa: BLE001 - a store that cannot be opened: the run goes on without it
                _warn_stopped(cls.name, exc)
                continue
            self.trackers.append(tracker)
        ids = {t.key: t.ids() for t in self.trackers if t.ids()}
        if ids:
            atomic_write_json(ids_path, ids)

    def _each(self, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - whatever the backend hit (disk, database, its own threads)
                self.trackers.remove(tracker)
                _warn_stopped(tracker.name, exc)
                try:
                    tracker.close("FAILED")
                except Exception:  # noqa: BLE001 - the same failure again
                    pass

    def log(self, record: dict) -> None:
        """One metrics.jsonl record: its numbers at its step."""
        metrics = scalars(record)
        if metrics:
            self._each(lambda t: t.log(metrics, record["step"]))

    def finish(self, summary: dict, artifact: Path | None) -> None:
        """The run ended well: its summary and artifact, then each run closed as finished."""
        self._each(lambda t: t.finish(summary, self.run_dir, artifact))
        self.trackers = []

    def close(self, status: str = "FAILED") -> None:
        """The run ended without finish() (an error, an interruption): each tracker ends its run."""
        self._each(lambda t: t.close(status))
        self.trackers = []


def _warn_stopped(name: str, exc: Exception) -> None:
    warn(f"{name} logging stopped ({' '.join(str(exc).split())[:200] or type(exc).__name__}); metrics.jsonl goes on")
