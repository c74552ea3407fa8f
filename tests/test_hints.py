"""End-of-run hints read overfitting, underfitting and instability from the curves."""

from tunelab.training.hints import curve_hints


def test_overfitting_underfitting_instability_and_a_healthy_run():
    falling = [{"step": i, "loss": 2.0 - i * 0.05} for i in range(30)]
    healthy = falling + [{"step": 30, "eval_loss": 1.2}, {"step": 31, "eval_loss": 1.0}, {"step": 32, "eval_loss": 0.9}]
    assert curve_hints(healthy) == []
    overfit = falling + [{"step": 30, "eval_loss": v} for v in (1.2, 0.8, 0.9, 1.1)]
    assert [h.split(":")[0] for h in curve_hints(overfit)] == ["overfitting"]
    flat = [{"step": i, "loss": 2.0 - i * 0.001} for i in range(30)]
    assert [h.split(":")[0] for h in curve_hints(flat)] == ["underfitting"]
    spiky = [{"step": i, "loss": 4.0 if i % 5 == 4 else 1.0 - i * 0.02} for i in range(30)]
    assert "instability" in [h.split(":")[0] for h in curve_hints(spiky)]
