"""Hostile input and faults: each answered with one clear error (exit 2 from the CLI), nothing half-written."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab
from helpers import interrupted_copy, run_cli, toy_rows, train_tiny_run
from tunelab.config import build_config, load_config
from tunelab.errors import ConfigError, DataError, UserError
from tunelab.runs import list_runs
from tunelab.training.lock import RunLock
from tunelab.training.loop import Trainer
from tunelab.training.watchdog import Watchdog


def one_error_line(result, *parts):
    """The CLI contract: exit 2, no traceback, exactly one `error:` line holding every part."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


@pytest.fixture
def workdir(tmp_path, smol_tokenizer):
    """A folder with toy data and a config for a short tiny-llama run (tiny-llama's cache already built)."""
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in toy_rows()), encoding="utf-8"
    )
    (tmp_path / "config.yaml").write_text(
        "model: tiny-llama\nout_dir: runs\nrun_name: r\ndata:\n  train: data.jsonl\n  max_length: 64\n"
        "train:\n  max_steps: 2\n  batch_size: 4\n  precision: fp32\n",
        encoding="utf-8",
    )
    return tmp_path


def no_run_written(workdir):
    return not (workdir / "runs").exists() or not any((workdir / "runs").iterdir())


# --- data files and out_dir ----------------------------------------------------------------------


def test_symlink_loop_as_data_file(workdir):
    (workdir / "loop_a").symlink_to(workdir / "loop_b")
    (workdir / "loop_b").symlink_to(workdir / "loop_a")
    one_error_line(
        run_cli(["train", "config.yaml", "data.train=loop_a", "--no-progress"], workdir),
        "loop_a",
        "cannot read the file",
        "symbolic links",
    )
    assert no_run_written(workdir)


def test_unreadable_data_file(workdir, monkeypatch):
    # root reads any file whatever its mode, so the refusal the kernel gives other users is simulated
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "data.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"data\.jsonl: cannot read the file: Permission denied"):
        tunelab.train(str(workdir / "config.yaml"), [f"out_dir={workdir / 'runs'}"], progress=False)
    assert no_run_written(workdir)


@pytest.mark.parametrize(
    "out_dir,message",
    [
        ("afile", "is a file, not a folder"),
        ("afile/sub", "is a file, not a folder"),
        ("/proc/tunelab-runs", "cannot create the run folder"),
    ],
)
def test_out_dir_that_cannot_hold_runs(workdir, out_dir, message):
    (workdir / "afile").write_text("x")
    if out_dir == "afile":  # the CLI's answer once; the others in-process (the same UserError path)
        one_error_line(
            run_cli(["train", "config.yaml", f"out_dir={out_dir}", "--no-progress"], workdir), out_dir, message
        )
        return
    with pytest.raises(UserError, match=message):
        tunelab.train(str(workdir / "config.yaml"), [f"out_dir={workdir / out_dir}"], progress=False)


def test_read_only_out_dir_fails_before_any_work(workdir, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a read-only mount answers (root included)
    cfg = load_config(workdir / "config.yaml", [f"out_dir={workdir / 'ro'}"])
    with pytest.raises(UserError, match="is not writable"):
        Trainer(cfg, progress=False)


# --- config --------------------------------------------------------------------------------------


def test_duplicate_yaml_keys_are_refused(workdir):
    (workdir / "dup.yaml").write_text((workdir / "config.yaml").read_text() + "train:\n  lr: 0.1\n", encoding="utf-8")
    one_error_line(
        run_cli(["train", "dup.yaml", "--no-progress"], workdir), "dup.yaml:11", "duplicate key 'train'", "line 7"
    )
    with pytest.raises(ConfigError, match="duplicate key 'r'"):
        load_config(None, ["lora={r: 4, r: 8}"])


@pytest.mark.parametrize(
    "targets,named",
    [("[nope]", "'nope'"), ("[q_proj, v_prj]", "did you mean 'v_proj'"), ("zzz", "'zzz' matches no module name")],
)
def test_target_modules_that_match_nothing(workdir, targets, named):
    if targets == "[nope]":
        one_error_line(
            run_cli(["train", "config.yaml", f"lora.target_modules={targets}", "--no-progress"], workdir),
            "lora.target_modules",
            named,
        )
    else:
        with pytest.raises(ConfigError, match=f"lora.target_modules: .*{named}"):
            tunelab.train(
                str(workdir / "config.yaml"),
                [f"lora.target_modules={targets}", f"out_dir={workdir / 'runs'}"],
                progress=False,
            )
    assert no_run_written(workdir)


def test_ia3_feedforward_modules_are_checked_too():
    from tunelab.methods import get_method
    from tunelab.models import load_causal_lm

    cfg = build_config(
        {
            "model": "tiny-llama",
            "method": "ia3",
            "ia3": {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_projj"]},
        }
    )
    with pytest.raises(ConfigError, match="ia3.feedforward_modules: 'down_projj'.*did you mean 'down_proj'"):
        get_method("ia3").apply(load_causal_lm("tiny-llama"), cfg)


# --- divergence and collapse ---------------------------------------------------------------------


def test_huge_lr_stops_with_the_reason_and_the_run_shows_failed(workdir):
    result = run_cli(["train", "config.yaml", "train.lr=1e9", "train.max_steps=30", "--no-progress"], workdir)
    line = one_error_line(result, "collapsed", "gradients exactly zero", "ln(vocabulary)", "train.lr 1e+09")
    failure = json.loads((workdir / "runs" / "r" / "failure.json").read_text())
    assert failure["error"] in line and failure["step"] < 30
    assert not (workdir / "runs" / "r" / "adapter").exists()  # the destroyed weights are not the run's artifact
    [row] = list_runs(workdir / "runs")
    assert row["status"] == "failed" and "collapsed" in row["detail"]


def test_watchdog_catches_divergence_not_noise():
    dog = Watchdog(uniform_loss=10.8)
    noisy = [2.0, 1.5, 1.2, 1.6, 1.0, 0.9, 1.4, 0.8, 0.7, 1.1, 0.6]  # spikes, but the run is learning
    assert all(dog.check(i, loss, 1.0) is None for i, loss in enumerate(noisy, 1))
    stopped = [dog.check(12 + i, loss, 5.0) for i, loss in enumerate([3.0, 4.0, 5.0, 6.0, 7.0])]
    assert stopped[-1] is not None and "diverged" in stopped[-1] and not any(stopped[:2])
    flat = Watchdog()
    assert "collapsed" in [flat.check(i, 3.0, 0.0) for i in range(3)][-1]


# --- faults mid-run ------------------------------------------------------------------------------


def test_run_folder_turning_read_only_mid_run(tiny_config, monkeypatch):
    """Writes start failing after the step-2 checkpoint: one error naming the file, the last complete
    checkpoint kept and resumable."""
    import tunelab.training.loop as loop

    real_save = loop.save_checkpoint

    def save(root, step, *args, **kwargs):
        if step > 2:
            raise PermissionError(13, "Permission denied", str(root / f".step-{step}.x1"))
        return real_save(root, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save)
    tiny_config["train"].update(max_steps=6, save_every=2)
    with pytest.raises(UserError) as err:
        tunelab.train(tiny_config, progress=False)
    run = Path(tiny_config["out_dir"]) / "tiny"
    message = str(err.value)
    assert f"{run}/checkpoints/.step-4.x1: Permission denied" in message and "stopped at step 4" in message
    assert f"the last complete checkpoint is {run}/checkpoints/step-2" in message
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = tunelab.train(None, resume=run, progress=False)
    assert resumed.summary["steps"] == 6 and not (run / "failure.json").exists()


def test_tensorboard_failure_is_one_warning_and_metrics_go_on(tiny_config, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    result = tunelab.train(tiny_config, progress=False)
    err = capsys.readouterr().err
    assert err.count("warning: TensorBoard logging stopped") == 1 and "Traceback" not in err
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 5


# --- resume --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    return train_tiny_run(tmp_path_factory.mktemp("four"), max_steps=4, save_every=2, lr=1e-3, warmup_ratio=0.0)


@pytest.fixture
def interrupted(four_steps, tmp_path):
    """A copy of that run killed after its step-2 checkpoint, its last metrics line torn by the kill."""
    full = four_steps
    run = interrupted_copy(full.run_dir, tmp_path / "killed", last_step=4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')
    (run / "checkpoints" / ".step-4.ab12cd").mkdir()  # a checkpoint write the kill cut short
    return full, run


def test_torn_metrics_line_and_orphaned_temp_folder_do_not_block_a_resume(interrupted):
    full, run = interrupted
    resumed = tunelab.train(None, resume=run, progress=False)
    assert resumed.summary["final_train_loss"] == pytest.approx(full.summary["final_train_loss"], rel=1e-4)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_resume_applies_a_new_lr_and_records_it(interrupted):
    from tunelab.io import read_metrics

    full, run = interrupted
    resumed = tunelab.train(None, ["train.lr=0.05"], resume=run, progress=False)
    before, after = read_metrics(full.run_dir / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    # the logged lr is the next step's; same schedule shape, 50x the base LR from step 3 on
    assert after[1]["lr"] == pytest.approx(before[1]["lr"])
    assert after[2]["lr"] == pytest.approx(50 * before[2]["lr"]) and after[2]["lr"] > 0
    assert load_config(run / "config.yaml").train.lr == 0.05
    [record] = resumed.summary["resumes"]
    assert record["step"] == 2 and record["changes"] == {"train.lr": [1e-3, 0.05]}
    assert json.loads((run / "resumes.jsonl").read_text())["changes"] == record["changes"]


def test_resume_refuses_what_would_change_the_steps_taken(interrupted):
    _, run = interrupted
    with pytest.raises(
        ConfigError, match=r"cannot change on resume: lora.r \(16 -> 4\).*may change on resume: train.lr"
    ):
        tunelab.train(None, ["lora.r=4"], resume=run, progress=False)
    assert not (run / "resumes.jsonl").exists()


def test_two_trainers_cannot_share_a_run(interrupted):
    _, run = interrupted
    holder = RunLock(run).acquire()
    try:
        with pytest.raises(UserError, match=f"another tunelab process \\(pid {os.getpid()}\\) is training this run"):
            tunelab.train(None, resume=run, progress=False)
        assert [r["status"] for r in list_runs(run.parent) if r["run"] == run.name] == ["running"]
    finally:
        holder.release()
    assert tunelab.train(None, resume=run, progress=False).summary["steps"] == 4


def test_lock_is_released_when_the_holder_is_killed(interrupted):
    _, run = interrupted
    code = f"import time; from tunelab.training.lock import RunLock; held = RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert [r["status"] for r in list_runs(run.parent) if r["run"] == run.name] == ["running"]
    finally:
        proc.kill()
        proc.wait()
    assert [r["status"] for r in list_runs(run.parent) if r["run"] == run.name] == ["interrupted"]


# --- tunelab runs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"{}", None),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b"\xff\xfe{", "not valid JSON"),
        (b'{"method": "lora", "mo', "not valid JSON"),
    ],
)
def test_runs_lists_every_run_and_names_broken_summaries(tmp_path, content, reason):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny-llama\nmethod: ia3\n")
    (run / "summary.json").write_bytes(content)
    [row] = list_runs(tmp_path / "runs")
    assert row["status"] == ("finished" if reason is None else "broken")
    assert row["method"] == "ia3"  # read from config.yaml when the summary does not say
    if reason:
        assert reason in row["detail"]
    if content == b"[1, 2]":  # the table as printed, once
        result = run_cli(["runs", "runs"], tmp_path)
        assert result.returncode == 0 and "Traceback" not in result.stderr and reason in result.stdout, result.stderr


def test_runs_shows_unfinished_runs(interrupted):
    full, run = interrupted
    rows = {r["run"]: r for r in list_runs(run.parent)}
    assert rows[run.name]["status"] == "interrupted" and "--resume" in rows[run.name]["detail"]
    assert {r["status"] for r in list_runs(full.run_dir.parent)} == {"finished"}


# --- adapters, pickles, generation flags, data check ---------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("fin"), val_fraction=0, max_steps=1).run_dir


def test_adapter_config_holding_a_list(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / "run")
    (run / "adapter" / "adapter_config.json").write_text("[1, 2, 3]")
    one_error_line(
        run_cli(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"], tmp_path),
        "adapter_config.json",
        "expected a JSON object, got list",
    )


def test_adapter_config_with_wrong_field_types(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / "run")
    path = run / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"r": "sixteen"}))
    with pytest.raises(UserError, match="cannot load the trained adapter"):
        tunelab.load(run)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_under_allow_pickle_is_refused_and_does_not_run(tmp_path):
    from tunelab.models import resolve_model_path

    model = shutil.copytree(resolve_model_path("tiny-llama"), tmp_path / "model")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _RunsCode()}))
    (tmp_path / "config.yaml").write_text(f"model: {model}\nallow_pickle: true\ndata:\n  train: d.jsonl\n")
    (tmp_path / "d.jsonl").write_text(json.dumps(toy_rows(1)[0]) + "\n")
    one_error_line(run_cli(["train", "config.yaml", "--no-progress"], tmp_path), "refused", "nothing in them ran")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("flag", [["--temperature", "nan"], ["--top-p", "inf"], ["--repetition-penalty", "nan"]])
def test_generation_flags_are_checked_before_the_model_loads(tmp_path, flag):
    # the model does not exist: the flag error must come first
    one_error_line(run_cli(["generate", "no-such-model", "--prompt", "hi", *flag], tmp_path), "finite number")


def test_data_check_where_every_row_is_invalid_gives_the_reasons(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": ""}\n{"instruction": "b", "output": 3e}\n')
    result = run_cli(["data", "check", "d.jsonl", "--model", "tiny-llama", "--json"], tmp_path)
    one_error_line(result, "d.jsonl", "2 of 2 records are invalid")
    report = json.loads(result.stdout)
    assert report["valid"] == 0 and any("field 'output': is empty" in p for p in report["problems"])
    assert any("invalid JSON" in p for p in report["problems"])


def test_skip_invalid_training_with_no_valid_row_names_the_first_problem(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": ""}\n')
    cfg = {
        "model": "tiny-llama",
        "out_dir": str(tmp_path / "runs"),
        "data": {"train": str(tmp_path / "d.jsonl"), "skip_invalid": True},
    }
    with pytest.raises(
        DataError, match=r"no valid records \(1 invalid; the first: .*d.jsonl:1: field 'output': is empty"
    ):
        tunelab.train(cfg, progress=False)
