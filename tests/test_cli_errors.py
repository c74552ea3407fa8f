"""The CLI as a user runs it: bad inputs exit 2 with one clear message and leave nothing behind."""

import json

import pytest

from helpers import run_cli

GOOD_ROWS = [{"instruction": f"Repeat: {w}", "output": w} for w in ["red", "green", "blue", "红色", "蓝色"]]


def jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# name -> (data file contents, extra top-level YAML, overrides, what stderr must name)
BAD_INPUTS = {
    "truncated_json": (
        jsonl(GOOD_ROWS[:3]) + '{"instruction": "Repeat: x", "outp\n' + jsonl(GOOD_ROWS[3:]),
        "",
        [],
        ["data.jsonl:4", "invalid JSON"],
    ),
    "missing_field": (
        jsonl(GOOD_ROWS[:2] + [{"instruction": "Repeat: x"}] + GOOD_ROWS[2:]),
        "",
        [],
        ["data.jsonl:3", "output", "missing"],
    ),
    "empty_file": ("", "", [], ["data.jsonl", "empty"]),
    # config errors are all reported at once, so one run covers a wrong format name and an unknown key
    "bad_format_and_unknown_key": (
        jsonl(GOOD_ROWS),
        "train:\n  lrr: 0.001\n",
        ["data.format=alpacca"],
        [
            "config.yaml",
            "data.format",
            "did you mean 'alpaca'",
            "config.yaml:8",
            "unknown key 'train.lrr'",
            "did you mean 'lr'",
        ],
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _tiny_llama_built(smol_tokenizer):
    """Build the tiny model's cache before the subprocesses run (its build output is not an error)."""


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_train_bad_input_exits_2_cleanly(tmp_path, case):
    data, extra_yaml, overrides, expected = BAD_INPUTS[case]
    (tmp_path / "data.jsonl").write_text(data, encoding="utf-8")
    (tmp_path / "config.yaml").write_text(
        "model: tiny-llama\n"
        "out_dir: runs\n"
        "data:\n"
        "  train: data.jsonl\n"
        "  max_length: 64\n"
        "  val_fraction: 0.2\n"
        f"{extra_yaml}",
        encoding="utf-8",
    )
    result = run_cli(["train", "config.yaml", "train.max_steps=1", *overrides, "--no-progress"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for part in expected:
        assert part in result.stderr, f"{part!r} not in {result.stderr!r}"
    assert result.stdout.strip() == ""  # no run directory printed
    runs = tmp_path / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()]


def test_data_check_good_file(tmp_path):
    (tmp_path / "good.jsonl").write_text(jsonl(GOOD_ROWS), encoding="utf-8")
    result = run_cli(["data", "check", "good.jsonl", "--model", "tiny-llama", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "alpaca"
    assert (report["records"], report["valid"], report["invalid"]) == (5, 5, 0)
    assert report["problems"] == []
    tokens = report["tokens"]
    assert tokens["min"] <= tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"]
    assert tokens["total"] >= 5 * tokens["min"] > 0
    assert report["truncated_at_max_length"] == 0


def test_data_check_bad_record(tmp_path):
    rows = GOOD_ROWS[:2] + [{"instruction": "Repeat: x", "output": ["not", "a", "string"]}] + GOOD_ROWS[2:]
    (tmp_path / "bad.jsonl").write_text(jsonl(rows) + '{"instruction": "trunc\n', encoding="utf-8")
    result = run_cli(["data", "check", "bad.jsonl", "--model", "tiny-llama", "--json"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert (report["records"], report["valid"], report["invalid"]) == (7, 5, 2)
    assert any("bad.jsonl:3" in p and "output" in p for p in report["problems"])
    assert any("bad.jsonl:7" in p and "JSON" in p for p in report["problems"])
    assert "tokens" in report  # the valid records are still measured


def test_a_reader_that_goes_away_stops_the_output_quietly(tmp_path):
    # `tunelab data check F --json | head -2`: the pipe's reader closed before tunelab wrote
    import subprocess
    import sys

    (tmp_path / "good.jsonl").write_text(jsonl(GOOD_ROWS), encoding="utf-8")
    args = [sys.executable, "-m", "tunelab", "data", "check", "good.jsonl", "--model", "tiny-llama", "--json"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the child has imported torch and checked the file
    stderr = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize("args", [["show", "--n", "-1"], ["show", "--n", "0"], ["check", "--max-length", "0"]])
def test_data_commands_refuse_counts_the_config_would(tmp_path, capsys, args):
    from tunelab.cli import main

    (tmp_path / "good.jsonl").write_text(jsonl(GOOD_ROWS), encoding="utf-8")
    with pytest.raises(SystemExit) as stop:  # --n -1 showed all but the last record; --max-length 0 dropped them all
        main(["data", args[0], str(tmp_path / "good.jsonl"), *args[1:]])
    assert stop.value.code == 2 and "must be at least" in capsys.readouterr().err
