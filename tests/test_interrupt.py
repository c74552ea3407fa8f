"""SIGTERM mid-run: the step finishes, a complete checkpoint is written, and resuming matches an
uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import yaml


def _config(tmp_path, toy_data, name):
    cfg = {
        "model": "tiny-llama",
        "out_dir": str(tmp_path / "runs"),
        "run_name": name,
        "seed": 0,
        "data": {"train": str(toy_data), "val_fraction": 0, "max_length": 64},
        "train": {"max_steps": 120, "batch_size": 2, "lr": 1e-3, "precision": "fp32", "log_every": 1},
        "lora": {"dropout": 0.1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path, toy_data):
    cmd = [sys.executable, "-m", "tunelab", "train", "--no-progress"]
    proc = subprocess.Popen(
        cmd + [str(_config(tmp_path, toy_data, "killed"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run = tmp_path / "runs" / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(_losses(run)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and f"tunelab train --resume {run}" in err
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").exists()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped_at < 120 and len(_losses(run)) == stopped_at
    assert not (run / "summary.json").exists()

    # resume (the newest unfinished run is found on its own) and compare with an uninterrupted run
    config = _config(tmp_path, toy_data, "killed")
    done = subprocess.run(
        cmd + [str(config), "--resume", "train.log_every=1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    # an uninterrupted run of the same length for reference, in-process
    import tunelab

    reference = tunelab.train(str(_config(tmp_path, toy_data, "reference")), progress=False)
    a, b = _losses(run), _losses(reference.run_dir)
    assert len(a) == len(b) == 120
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert json.loads((run / "summary.json").read_text())["final_train_loss"] == reference.summary["final_train_loss"]
