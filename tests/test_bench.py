"""tunelab bench: the bundled dataset, and a short end-to-end run on tiny-llama (both phases, real subprocesses)."""

import json
import math
import re
import sys
import time

import pytest

from tunelab.bench.data import length_stats, make_bench_rows
from tunelab.bench.run import encode_rows, run_bench
from tunelab.bench.turns import run_by_turns, run_one_after_another
from tunelab.cli import main
from tunelab.data.encode import resolve_chat_template


def test_bench_rows_are_seeded_and_long_tailed(smol_tokenizer):
    rows = make_bench_rows(300, seed=3)
    assert rows == make_bench_rows(300, seed=3)
    assert rows != make_bench_rows(300, seed=4)
    assert any(re.search(r"[\u4e00-\u9fff]", r["messages"][0]["content"]) for r in rows)  # Chinese is mixed in
    encoded = encode_rows(rows, smol_tokenizer, resolve_chat_template(smol_tokenizer), 512)
    stats = length_stats([len(e["input_ids"]) for e in encoded])
    assert stats["examples"] == 300  # nothing truncated away
    assert stats["p90_over_p10"] > 3
    assert stats["share_40_150"] > 0.6 and stats["share_over_300"] > 0.01
    assert stats["max"] <= 512


def test_bench_tiny_llama(tmp_path):
    out = tmp_path / "bench.json"
    # 3 steps: a warm-up, a timed one and the profiled last one
    report = run_bench("tiny-llama", steps=3, batch_size=4, matmul_size=256, out=str(out), profile=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for name in ("baseline", "fast"):
        phase = report[name]
        assert phase["timed_steps"] == 1 and phase["profiled_steps"] == 1
        table = (tmp_path / f"bench-profile-{name}.txt").read_text()
        assert phase["profile_table"] == str(tmp_path / f"bench-profile-{name}.txt") and "Self CPU" in table
        parts = report["step_breakdown_s"][name]
        assert set(parts) == {"forward", "backward", "optimizer", "data"} and all(v >= 0 for v in parts.values())
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
        # the parts are the step: forward + backward + optimizer never exceed it, data is the rest
        assert sum(parts.values()) == pytest.approx(phase["step_time_s"]["mean"], rel=1e-6)
    # the largest per-step difference bounds that of the mean loss (positive losses)
    assert report["loss_rel_diff_trajectory"] >= report["loss_rel_diff_train"] - 1e-12
    # the MFU divides by the best matmul probe of the run (before and after the phases; fp32 per phase too)
    for precision, probes in report["peak_flops_probes_per_s"].items():
        assert set(probes) == {"before", "after"} and all(f > 0 for f in probes.values())
        assert report["peak_flops_per_s"][precision] >= max(probes.values())
    assert set(report["meets_targets"]) == {"speedup", "mfu", "mem_ratio", "heldout_loss", "train_loss_trajectory"}
    for key in ("speedup", "mem_ratio", "loss_rel_diff", "cpu_capability", "precision", "mfu", "mfu_formula"):
        assert key in report
    assert report["speedup"] > 0 and report["mem_ratio"] > 0
    for name in ("baseline", "fast"):
        phase = report[name]
        assert phase["useful_tokens_per_s"] > 0
        assert math.isfinite(phase["final_train_loss"]) and math.isfinite(phase["heldout_loss"])
        assert phase["peak_mem_bytes"] > 0 and report["mfu"][name] > 0
    assert report["baseline"]["useful_tokens"] == report["fast"]["useful_tokens"] > 0
    # the same model and adapter in both phases: the MFU of each counts the same base parameters
    counts = [(report[n]["base_params"], report[n]["trainable_params"]) for n in ("baseline", "fast")]
    assert counts[0] == counts[1] and counts[0][1] > 0
    assert all(report["checks"].values()), report["checks"]
    assert report["fast"]["packed_batches"] and report["packing_active"]
    assert report["fused_mlps"] == 2  # tiny-llama's gated MLPs
    # same examples, same order, same initial adapter: the two loss curves agree closely
    assert report["loss_rel_diff"] < 1e-3
    # by turns: the phases' steps alternate, baseline first, and none overlaps another
    assert report["phases_by_turns"]
    spans = sorted((start, end, name) for name in ("baseline", "fast") for start, end in report[name]["step_spans"])
    assert [name for *_, name in spans] == ["baseline", "fast"] * 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


TURNS_CHILD = """
import sys, time
from tunelab.bench.turns import Turns
turns = Turns(sys.argv[-1])
turns.pass_turn()
for step in range({steps}):
    start = time.perf_counter()
    time.sleep(0.02)
    if step == {fail_at}:
        sys.exit(3)
    print("{name}", start, time.perf_counter(), file=open(sys.argv[1], "a"))
    turns.pass_turn()
"""


def _child(name, log, steps, fail_at=-1):
    code = TURNS_CHILD.format(name=name, steps=steps, fail_at=fail_at)
    return [sys.executable, "-c", code, str(log)]


def test_phases_by_turns_never_overlap(tmp_path):
    log = tmp_path / "spans.txt"
    run_by_turns({"a": _child("a", log, 3), "b": _child("b", log, 5)})
    rows = [line.split() for line in log.read_text().splitlines()]
    spans = sorted((float(s), float(e), n) for n, s, e in rows)
    # one turn each in the given order; the longer one has the turns left
    assert [n for *_, n in spans] == ["a", "b", "a", "b", "a", "b", "b", "b"]
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))


def test_sequential_phases_run_one_after_the_other(tmp_path):
    log = tmp_path / "spans.txt"
    ran = tmp_path / "b-ran"
    # without turns each phase runs to its end before the next starts (the children get no --turns)
    child = 'import sys, time; t = time.perf_counter(); time.sleep(0.05); print(sys.argv[2], t, time.perf_counter(), file=open(sys.argv[1], "a"))'
    run_one_after_another({n: [sys.executable, "-c", child, str(log), n] for n in ("a", "b")})
    rows = [line.split() for line in log.read_text().splitlines()]
    assert [r[0] for r in rows] == ["a", "b"] and float(rows[0][2]) <= float(rows[1][1])
    with pytest.raises(RuntimeError, match="the a phase failed .exit 4."):
        run_one_after_another(
            {
                "a": [sys.executable, "-c", "raise SystemExit(4)"],
                "b": [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(ran)],
            }
        )
    assert not ran.exists()  # b never ran


def test_a_failing_phase_stops_the_other(tmp_path):
    log = tmp_path / "spans.txt"
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="the b phase failed .exit 3."):
        run_by_turns({"a": _child("a", log, 1000), "b": _child("b", log, 1000, fail_at=1)})
    assert time.perf_counter() - t0 < 15  # not a's 1,000 turns
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["a", "b", "a"]


def test_bench_cli_rejects_too_few_steps(capsys):
    assert main(["bench", "--model", "tiny-llama", "--steps", "1"]) == 2
    assert "warm-up" in capsys.readouterr().err
