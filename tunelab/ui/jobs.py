"""Starting `tunelab train` from the dashboard's form, and stopping a run gracefully.

The form's fields become the same dotted overrides the command line takes (values parsed the same way), on
top of the method block (YAML). The result is written to RUNS/.tunelab-ui/configs/NAME.yaml and read back
with `load_config`, so a bad key gets the CLI's own message for that file, which `tunelab train FILE`
reproduces. A valid config is then trained by `tunelab train FILE` in its own process (and session: it
outlives the dashboard), its output in RUNS/.tunelab-ui/logs/NAME.log.

Stopping sends SIGTERM, which the trainer turns into: finish the step, checkpoint, exit with a resume hint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import apply_overrides, load_config
from ..errors import ConfigError, UserError
from ..io import atomic_write_text, plain_name_problem
from ..training.lock import LOCK_FILE, is_locked
from ..training.run_dir import default_run_name
from ..yamlio import read_yaml

UI_DIR = ".tunelab-ui"  # inside a runs directory; not a run folder (no config.yaml), so never listed


@dataclass
class StartForm:
    model: str = ""
    method: str = ""
    data: str = ""  # the training file, relative to the dashboard's working directory or absolute
    steps: str = ""
    lr: str = ""
    method_block: str = ""  # YAML: the method's section(s), e.g. "lora:\n  r: 8"
    overrides: str = ""  # more dotted.key=value lines, as on the command line
    run_name: str = ""


@dataclass
class Job:
    name: str
    config: Path
    log: Path
    process: subprocess.Popen

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


def form_overrides(form: StartForm, cwd: Path) -> list[str]:
    """The form as command-line overrides (empty fields left to the config's defaults)."""
    overrides = []
    data = form.data.strip()
    if data and not Path(data).expanduser().is_absolute():
        data = str(cwd / data)
    for key, value in (
        ("model", form.model),
        ("method", form.method),
        ("data.train", data),
        ("train.max_steps", form.steps),
        ("train.lr", form.lr),
        ("run_name", form.run_name),
    ):
        if value.strip():
            overrides.append(f"{key}={value.strip()}")
    overrides += [line.strip() for line in form.overrides.splitlines() if line.strip() and not line.startswith("#")]
    return overrides


def form_config(form: StartForm, out_dir: Path, cwd: Path) -> dict:
    try:
        block = read_yaml(form.method_block) if form.method_block.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"method block: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(block, dict):
        raise ConfigError("method block: expected YAML keys, e.g. `lora: {r: 8}`")
    data = apply_overrides(block, form_overrides(form, cwd))
    data["out_dir"] = str(out_dir)  # the dashboard shows only its runs directories
    return data


def _unique_name(out_dir: Path, name: str) -> str:
    """The name `create_run_dir` would give: `name`, else name-2, name-3... (so the dashboard knows it)."""
    candidate, n = name, 2
    while (out_dir / candidate).exists() or (out_dir / UI_DIR / "logs" / f"{candidate}.log").exists():
        candidate, n = f"{name}-{n}", n + 1
    return candidate


class Jobs:
    """The trainings this dashboard started, by run folder."""

    def __init__(self, cwd: Path | None = None):
        self.cwd = cwd or Path.cwd()
        self.jobs: dict[Path, Job] = {}
        self._lock = threading.Lock()

    def start(self, form: StartForm, out_dir: Path) -> Job:
        """Validate the form's config (ConfigError: the CLI's message) and start training it."""
        configs = out_dir / UI_DIR / "configs"
        data = form_config(form, out_dir, self.cwd)
        draft = configs / f"{form.run_name.strip() or 'new-run'}.yaml"
        if plain_name_problem(draft.stem):
            draft = configs / "new-run.yaml"  # the config model reports the bad run_name itself
        atomic_write_text(draft, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        cfg = load_config(draft)
        with self._lock:
            name = _unique_name(out_dir, cfg.run_name or default_run_name(cfg))
            config = configs / f"{name}.yaml"
            atomic_write_text(config, yaml.safe_dump(data | {"run_name": name}, sort_keys=False, allow_unicode=True))
            if draft != config:
                draft.unlink(missing_ok=True)
            log = out_dir / UI_DIR / "logs" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "tunelab", "train", str(config), "--no-progress"],
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C on the dashboard does not stop its trainings
                )
            job = Job(name, config, log, process)
            self.jobs[out_dir / name] = job
        return job

    def get(self, run: Path) -> Job | None:
        return self.jobs.get(run)

    def stop(self, run: Path) -> int:
        """SIGTERM to the process training `run` (started here or elsewhere); returns its pid."""
        job = self.jobs.get(run)
        if job is not None and job.returncode is None:
            job.process.send_signal(signal.SIGTERM)
            return job.process.pid
        if not is_locked(run):
            raise UserError(f"{run.name}: not training (nothing to stop)")
        pid = _lock_holder(run)
        os.kill(pid, signal.SIGTERM)
        return pid


def _lock_holder(run: Path) -> int:
    """The pid the trainer wrote into RUN/.lock, checked to be a tunelab process."""
    try:
        pid = int((run / LOCK_FILE).read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        raise UserError(f"{run.name}: its lock file does not name the training process") from None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"tunelab" not in cmdline.read_bytes():
        raise UserError(f"{run.name}: process {pid} holding its lock is not tunelab; not signalled")
    return pid
