"""The estimate as a readable table (the JSON report is `--json`)."""

from __future__ import annotations

MIB = 2**20


def _mib(n) -> str:
    return "-" if n is None else f"{n / MIB:,.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GiB"


def _seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def text(r: dict) -> str:
    w = r["micro_batch"]
    lines = [
        f"{r['model']} | method {r['method']} | {r['device']} | precision {r['precision']}",
        f"params: trainable {r['trainable_params']:,} / total {r['total_params']:,} ({r['trainable_pct']:.3f}%)",
        f"largest micro-batch: {w['rows']} rows, {w['tokens']} tokens ({w['label_positions']} with a loss), "
        f"longest {w['seq_len']}",
        f"peak memory (gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}):",
    ]
    for key, value in r["memory"].items():
        if key != "total":
            lines.append(f"  {key:22s} {_mib(value):>12s}")
    other = r["memory_other_checkpointing"]["total"]
    lines.append(
        f"  {'total':22s} {_mib(r['memory']['total']):>12s}   (checkpointing {'off' if r['gradient_checkpointing'] else 'on'}: {_mib(other)})"
    )
    for strategy, mem in r.get("per_rank", {}).items():
        lines.append(f"  per rank, {strategy} x {r['nproc']}: {_mib(mem['total'])}")
    lines.append(
        f"time: {_seconds(r['step_seconds'])} per step ({r['step_flops'] / 1e12:.2f} TFLOP at "
        f"{r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak: {_seconds(r['step_compute_seconds'])}, "
        f"+ {_seconds(r['step_overhead_seconds'])} per-step overhead), run {_seconds(r['run_seconds'])} "
        f"({r['steps'] or '?'} steps)"
    )
    if "energy_kwh" in r:
        cost = f", cost {r['cost']:.2f}" if "cost" in r else ""
        lines.append(f"energy: {r['energy_kwh']:.3f} kWh at {r['power_w']:.0f} W ({r['power_source']}){cost}")
    if "probe" in r:
        p = r["probe"]
        lines.append(
            f"probe ({p['steps']} real steps): peak {_mib(p['peak_bytes'])} (estimate {_mib(r['memory']['total'])}), "
            f"step {_seconds(p['step_seconds'])} (estimate {_seconds(r['step_seconds'])}); corrected run "
            f"{_seconds(p['run_seconds'])}"
        )
    if r.get("advice"):
        lines.append(f"warning: predicted peak {_mib(r['memory']['total'])} > free {_mib(r['free_memory_bytes'])}")
    for a in r.get("advice", []):
        bound = " (loading the model sets it: fp32 weights + the file's pages)" if a.get("load_bound") else ""
        lines.append(f"  try {a['change']}: peak {_mib(a['peak_bytes'])}{bound}")
    if r.get("advice") and all(a.get("load_bound") for a in r["advice"]):
        lines.append("  no training setting lowers the load's peak: this model needs a machine with more memory")
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def methods_table(reports: list[dict]) -> str:
    head = f"{'method':9s} {'trainable':>14s} {'peak':>12s} {'ckpt peak':>12s} {'step':>9s} {'run':>9s}"
    lines = [head]
    for r in reports:
        lines.append(
            f"{r['method']:9s} {r['trainable_params']:>14,} {_mib(r['memory']['total']):>12s} "
            f"{_mib(r['memory_other_checkpointing']['total']):>12s} {_seconds(r['step_seconds']):>9s} "
            f"{_seconds(r['run_seconds']):>9s}"
        )
    return "\n".join(lines)
