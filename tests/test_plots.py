"""Plots from a hand-written run folder: valid PNGs, nothing written when there is nothing to plot."""

import json
import math

from tunelab.eval.plots import plot_confusion_matrix, plot_loss_curves, plot_run


def _write_metrics(run_dir, records):
    # json.dumps writes NaN as the bare token the trainer's own log would contain.
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _train_records(steps=20, loss=lambda s: 2.0 / (1 + 0.1 * s)):
    records = []
    for step in range(1, steps + 1):
        r = {
            "step": step,
            "loss": loss(step),
            "lr": 1e-3 * (1 - step / (steps + 1)),
            "grad_norm": 1.0,
            "tokens_per_s": 500.0,
        }
        if step % 5 == 0:
            r["eval_loss"] = 2.2 / (1 + 0.08 * step)
        records.append(r)
    return records


def _assert_png(path, min_side=100):
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert len(data) > 1024
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= min_side and image.shape[1] >= min_side


def test_loss_curves_png(tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    _write_metrics(run, _train_records())
    path = plot_loss_curves(run)
    assert path == run / "plots" / "loss.png"
    _assert_png(path)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # temp file renamed away


def test_confusion_matrix_png_with_chinese_labels(tmp_path):
    run = tmp_path / "cls-run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  labels: [正面, 负面, neutral]\n", encoding="utf-8")
    matrix = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
    (run / "eval.json").write_text(json.dumps({"eval_accuracy": 0.84, "eval_confusion_matrix": matrix}))
    path = plot_confusion_matrix(run)  # a missing-glyph warning is fine when no CJK font is installed
    assert path == run / "plots" / "confusion_matrix.png"
    _assert_png(path)


def test_confusion_matrix_falls_back_to_class_ids(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"eval_confusion_matrix": [[3, 1], [0, 4]]}))
    _assert_png(plot_confusion_matrix(tmp_path))


def test_nothing_to_plot_writes_nothing(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"eval_loss": 1.3}))
    assert plot_loss_curves(tmp_path) is None
    assert plot_confusion_matrix(tmp_path) is None
    assert plot_run(tmp_path) == []
    assert not (tmp_path / "plots").exists()


def test_nan_train_loss_does_not_crash(tmp_path):
    _write_metrics(tmp_path, _train_records(loss=lambda s: math.nan))
    path = plot_loss_curves(tmp_path)  # eval points remain, so there is still a plot
    _assert_png(path)


def test_all_nan_and_no_eval_is_none(tmp_path):
    _write_metrics(tmp_path, [{"step": 1, "loss": math.nan, "lr": 1e-3}])
    assert plot_loss_curves(tmp_path) is None
    assert not (tmp_path / "plots").exists()


def test_plot_run_writes_both(tmp_path):
    _write_metrics(tmp_path, _train_records())
    (tmp_path / "eval.json").write_text(json.dumps({"eval_confusion_matrix": [[1, 0], [0, 1]]}))
    assert sorted(p.name for p in plot_run(tmp_path)) == ["confusion_matrix.png", "loss.png"]


def test_confusion_matrix_of_a_data_eval_has_its_own_name(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"eval_confusion_matrix": [[1, 0], [0, 1]]}))
    (tmp_path / "eval-held_out.json").write_text(json.dumps({"eval_confusion_matrix": [[2, 1], [0, 3]]}))
    path = plot_confusion_matrix(tmp_path, "held_out")  # `tunelab eval RUN --data held_out.jsonl`
    assert path == tmp_path / "plots" / "confusion_matrix-held_out.png"
    _assert_png(path)
    assert not (tmp_path / "plots" / "confusion_matrix.png").exists()
