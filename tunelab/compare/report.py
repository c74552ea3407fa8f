"""results.json, report.md (plots linked from plots/) and report.html (self-contained: plots embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .choose import TASK_METRICS

MIB = 2**20
PLOTS = (("eval_loss.png", "Eval loss of every method"), ("quality_cost.png", "Quality against cost"))


def _num(v, fmt="{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The per-method table: header and rows of text (the same in Markdown and HTML)."""
    rows = results["methods"]
    metrics = [m for m in TASK_METRICS if any(m in (r.get("eval") or {}) for r in rows)]
    head = [
        "method",
        "status",
        "trainable %",
        "artifact MiB",
        "peak MiB predicted",
        "peak MiB measured",
        "tokens/s",
        "train wall s",
        "energy Wh",
        "final train loss",
        "eval loss",
        *metrics,
        "error / note",
    ]
    body = []
    for r in rows:
        ev = r.get("eval") or {}
        body.append(
            [
                r["method"],
                r["status"],
                _num(r.get("trainable_pct"), "{:.3f}"),
                _num(r["artifact_bytes"] / MIB if r.get("artifact_bytes") is not None else None, "{:.2f}"),
                _num(r["predicted_peak_bytes"] / MIB if r.get("predicted_peak_bytes") else None, "{:.0f}"),
                _num(r["peak_mem_bytes"] / MIB if r.get("peak_mem_bytes") else None, "{:.0f}"),
                _num(r.get("train_tokens_per_s"), "{:.0f}"),
                _num(r.get("train_wall_s"), "{:.1f}"),
                _num(r["energy_kwh"] * 1000 if r.get("energy_kwh") is not None else None, "{:.3g}"),
                _num(r.get("final_train_loss")),
                _num(ev.get("loss")),
                *[_num(ev.get(m)) for m in metrics],
                r.get("error") or r.get("reason") or "",
            ]
        )
    return head, body


def recommendation_text(results: dict) -> str:
    rec = results["recommendation"]
    budgets = rec["budgets"]
    within = []
    if budgets["mem_bytes"] is not None:
        within.append(f"peak memory <= {budgets['mem_bytes'] / MIB:.0f} MiB")
    if budgets["time_s"] is not None:
        within.append(f"training wall time <= {budgets['time_s']:.0f} s")
    scope = f" within {' and '.join(within)}" if within else " (no budgets given)"
    if rec["method"] is None:
        return f"No recommendation on {rec['metric']}{scope}: {rec['why']}."
    return f"Recommended: **{rec['method']}**: {rec['why']}{scope}."


def _fronts(results: dict) -> str:
    f = results["pareto"]
    return (
        f"Pareto front ({results['metric']} vs peak memory): {', '.join(f['peak_mem_bytes']) or '-'}; "
        f"vs wall time: {', '.join(f['train_wall_s']) or '-'}."
    )


def _setup(results: dict) -> str:
    s = results["setup"]
    return (
        f"{s['model']}, task {s['task']}, seed {s['seed']}, {s['steps']} steps, batch {s['batch_size']} x "
        f"grad_accum {s['grad_accum']}, data {s['train']}, evaluation {s['evaluation']}; comparison wall time "
        f"{results['wall_s']:.0f} s on {s['device']}."
    )


def markdown(results: dict) -> str:
    head, body = table(results)
    lines = [f"# tunelab compare: {', '.join(r['method'] for r in results['methods'])}", "", _setup(results), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += ["", recommendation_text(results), "", _fronts(results), ""]
    for name, title in PLOTS:
        lines += [f"![{title}](plots/{name})", ""]
    return "\n".join(lines)


def page(results: dict, plots_dir: Path) -> str:
    head, body = table(results)
    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join(f'<tr class="{esc(row[1])}">' + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    images = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,'
        f'{base64.b64encode((plots_dir / name).read_bytes()).decode("ascii")}"><figcaption>{esc(title)}'
        "</figcaption></figure>"
        for name, title in PLOTS
    )
    rec = esc(recommendation_text(results)).replace("**", "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunelab compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child, td:nth-child(2), td:last-child {{ text-align: left; }}
tr.failed td, tr.skipped td {{ color: #a00; }}
.rec {{ font-size: 1.1em; margin: 1em 0; padding: 0.6em; background: #eef6ee; border-left: 4px solid #3a3; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>tunelab compare</h1>
<p>{esc(_setup(results))}</p>
<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>
<p class="rec">{rec}</p>
<p>{esc(_fronts(results))}</p>
{images}
</body></html>
"""


def write_reports(results: dict, out: Path) -> list[Path]:
    paths = [out / "results.json", out / "report.md", out / "report.html"]
    atomic_write_json(paths[0], results)
    atomic_write_text(paths[1], markdown(results))
    atomic_write_text(paths[2], page(results, out / "plots"))
    return paths
