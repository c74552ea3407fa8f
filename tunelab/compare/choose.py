"""Which metric ranks the methods, the budgets, the Pareto fronts of quality against cost, and the pick."""

from __future__ import annotations

from ..errors import UserError

# task metrics shown in the table when a run has them (eval.json keys without `eval_`)
TASK_METRICS = ("accuracy", "f1_macro", "exact_match", "bleu", "rougeL", "score")
COSTS = {"peak_mem_bytes": "peak memory", "train_wall_s": "wall time"}


def default_metric(cfg) -> str:
    """accuracy for classification, exact match for a causal LM that generates, else eval loss."""
    if cfg.task == "classification":
        return "accuracy"
    if cfg.task == "causal_lm" and cfg.eval.generate:
        return "exact_match"
    return "loss"


def higher_is_better(metric: str) -> bool:
    return not (metric.endswith("loss") or metric.endswith("ppl"))


def parse_budgets(mem: str | None, seconds: str | None) -> dict:
    """--budget-mem (bytes, or 2GiB / 1500MB) and --budget-time (seconds, or 90s / 10m / 1h) as numbers."""
    import humanfriendly

    out = {"mem_bytes": None, "time_s": None}
    try:
        if mem is not None:
            out["mem_bytes"] = int(humanfriendly.parse_size(mem, binary=True))
        if seconds is not None:
            out["time_s"] = float(humanfriendly.parse_timespan(seconds))
    except humanfriendly.InvalidSize as exc:
        raise UserError(f"--budget-mem {mem!r}: {exc}") from None
    except humanfriendly.InvalidTimespan as exc:
        raise UserError(f"--budget-time {seconds!r}: {exc}") from None
    return out


def value(row: dict, metric: str):
    v = (row.get("eval") or {}).get(metric)
    return v if isinstance(v, int | float) else None


def pareto_front(rows: list[dict], metric: str, cost: str) -> list[str]:
    """Methods no other method beats on both quality (metric) and cost (lower is better), ordered by cost."""
    sign = 1 if higher_is_better(metric) else -1
    points = [(r[cost], sign * value(r, metric), r["method"]) for r in rows if r.get(cost) is not None]
    points = [p for p in points if p[1] is not None]
    front = [
        p
        for p in points
        if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points if q is not p)
    ]
    return [p[2] for p in sorted(front)]


def recommend(rows: list[dict], metric: str, budgets: dict) -> dict:
    """The best finished method on `metric` whose measured peak memory and training wall time fit the budgets
    (ties: the lower peak); the others with why they were left out."""
    left_out, fits = {}, []
    for r in rows:
        if r["status"] != "ok":
            left_out[r["method"]] = r["status"]
        elif value(r, metric) is None:
            left_out[r["method"]] = f"no {metric}"
        elif budgets["mem_bytes"] is not None and r["peak_mem_bytes"] > budgets["mem_bytes"]:
            left_out[r["method"]] = f"peak memory {r['peak_mem_bytes'] / 2**20:.0f} MiB over the budget"
        elif budgets["time_s"] is not None and r["train_wall_s"] > budgets["time_s"]:
            left_out[r["method"]] = f"wall time {r['train_wall_s']:.0f} s over the budget"
        else:
            fits.append(r)
    sign = 1 if higher_is_better(metric) else -1
    best = max(fits, key=lambda r: (sign * value(r, metric), -r["peak_mem_bytes"]), default=None)
    out = {"metric": metric, "higher_is_better": higher_is_better(metric), "budgets": budgets, "left_out": left_out}
    if best is None:
        return out | {"method": None, "why": "no finished method with this metric fits the budgets"}
    return out | {
        "method": best["method"],
        "value": value(best, metric),
        "why": f"the best {metric} ({value(best, metric):.4g}) of the {len(fits)} finished method(s) that fit",
    }
