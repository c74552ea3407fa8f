"""`tunelab compare`: the same data, seed, step budget and evaluation for several methods, one report.

Each method trains in its own process (runner.py), its peak predicted first by `tunelab estimate`; then
choose.py ranks them (the metric, the budgets, the Pareto fronts), plots.py draws the curves and the
quality/cost charts and report.py writes OUT/results.json, report.md and report.html. A method that fails
is reported with its error and the others go on; one that does not apply to the task is skipped with why.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import UserError, did_you_mean

__all__ = ["run_compare"]


def _methods(spec: str) -> list[str]:
    from ..methods import METHODS

    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--methods: name at least one method, e.g. --methods lora,dora,ia3")
    for n in names:
        if n not in METHODS:
            raise UserError(f"--methods: unknown method {n!r}{did_you_mean(n, METHODS)}")
    if len(set(names)) != len(names):
        raise UserError("--methods: a method is named twice")
    return names


def _check_out(out: Path) -> None:
    if (out / "results.json").exists() or any((out / "runs").glob("*")):
        raise UserError(f"--out {out}: it already holds a comparison; choose another folder or remove it")


def _predicted_peak(cfg) -> int | None:
    from ..estimate import estimate

    try:  # the peak only: the step-time calibration would train a shrunk model per method first
        return estimate(cfg, overhead=False)["memory"]["total"]
    except Exception:  # noqa: BLE001 - no prediction is a gap in the report, not a reason to stop
        return None


def _setup(cfg, steps, device) -> dict:
    t = cfg.train
    evaluation = cfg.data.eval or (
        f"{cfg.data.val_fraction:g} of the data held out" if cfg.data.val_fraction else "none"
    )
    return {
        "model": cfg.model,
        "task": cfg.task,
        "seed": cfg.seed,
        "steps": steps,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "train": cfg.data.train,
        "evaluation": evaluation,
        "device": device,
    }


def run_compare(
    config,
    overrides: list[str],
    methods: str,
    out,
    budget_mem: str | None = None,
    budget_time: str | None = None,
    metric: str | None = None,
    progress: bool = True,
) -> dict:
    """Train every method, write the reports into `out`; returns results.json's content."""
    from tqdm import tqdm

    from ..config import load_config
    from ..device import pick_device
    from ..estimate import estimate
    from .choose import COSTS, default_metric, pareto_front, parse_budgets, recommend
    from .plots import plot_eval_curves, plot_quality_cost
    from .report import write_reports
    from .runner import has_validation, method_config, skip_reason, split_overrides, train_method

    t0 = time.perf_counter()
    names = _methods(methods)
    budgets = parse_budgets(budget_mem, budget_time)
    common, own = split_overrides(overrides, names)
    cfg = load_config(config, common)
    out = Path(out)
    _check_out(out)
    metric = metric or default_metric(cfg)
    steps = cfg.train.max_steps or estimate(cfg, baseline=False, overhead=False)["steps"]
    # 4 points a curve: each evaluation of the validation split costs several steps (measured: 7 s against a
    # 2.5 s step on smollm2 with 64 held-out examples): 8 of them were about a fifth of a comparison's time
    eval_every = max(1, steps // 4) if steps and has_validation(cfg) else None

    plan, rows = [], {}
    for name in names:
        reason = skip_reason(cfg, name)
        if reason:
            rows[name] = {"method": name, "status": "skipped", "reason": reason}
            continue
        try:
            plan.append((name, method_config(cfg, name, out, own[name], eval_every)))
        except UserError as exc:  # a bad per-method override fails that method only
            rows[name] = {"method": name, "status": "failed", "error": str(exc)}

    bar = tqdm(total=(steps or 1) * len(plan), unit="step", file=sys.stderr, dynamic_ncols=True, disable=not progress)
    with bar:
        for i, (name, mcfg) in enumerate(plan):
            bar.set_description(f"compare: {name} ({i + 1}/{len(plan)})")
            predicted = _predicted_peak(mcfg)
            done = bar.n

            def on_step(step, start=done):
                if min(step, steps or 1) + start > bar.n:  # redrawn only when a step is done
                    bar.update(min(step, steps or 1) + start - bar.n)

            row = train_method(mcfg, name, out, on_step)
            bar.update(done + (steps or 1) - bar.n)  # a failed method's unrun steps count as done
            rows[name] = row | {"predicted_peak_bytes": predicted}
            status = row["status"] if row["status"] == "ok" else f"failed: {row['error']}"
            bar.write(f"compare: {name} {status} ({row['wall_s']:.0f} s)", file=sys.stderr)

    ordered = [rows[n] for n in names]
    ok = [r for r in ordered if r["status"] == "ok"]
    results = {
        "metric": metric,
        "setup": _setup(cfg, steps, pick_device().type),
        "methods": ordered,
        "pareto": {cost: pareto_front(ok, metric, cost) for cost in COSTS},
        "recommendation": recommend(ordered, metric, budgets),
    }
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plot_eval_curves(ordered, out / "plots" / "eval_loss.png")
    plot_quality_cost(ordered, metric, out / "plots" / "quality_cost.png")
    results["wall_s"] = time.perf_counter() - t0
    write_reports(results, out)
    return results
