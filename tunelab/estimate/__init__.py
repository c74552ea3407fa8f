"""`tunelab estimate`: parameters, peak memory, step and run time, energy and cost of a run before it runs.

Nothing is loaded but the model's config: the model is built on the meta device (tunelab.estimate.params),
so a 70B config takes seconds. See memory.py for the terms and what a CPU peak includes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..errors import DataError, UserError
from .memory import Workload, block_state_bytes, breakdown, frozen_linear_bytes, lora_output_bytes, with_load

STRATEGIES = ("ddp", "fsdp")


def workload(cfg, method, shape, tokenizer_ok: bool, first: int = 1) -> tuple[Workload, Workload, int, list[str]]:
    """The run's largest micro-batch (from the data file's token lengths when there is one, with packing
    as the run does it), the largest of its first `first` steps (what the shallow copies train on), the number
    of training examples (0: unknown) and notes."""
    from ..training.batching import epoch_windows, step_batches

    t = cfg.train
    virtual = 0
    if method.virtual_tokens and cfg.method in ("prompt", "ptuning"):
        virtual = getattr(cfg, cfg.method).num_virtual_tokens  # prepended to every row's input
    for path in (cfg.data.train, cfg.data.eval):  # a typo is an error here too, not a silent max_length guess
        if path and not Path(path).exists():
            raise DataError(path, None, "file not found")
    if not cfg.data.train or not tokenizer_ok:
        max_length = cfg.data.max_length + virtual
        tokens = t.batch_size * max_length
        note = (
            "no data file: every example assumed max_length tokens long"
            if not cfg.data.train
            else ("no tokenizer for this model: every example assumed max_length tokens long")
        )
        work = Workload(tokens, t.batch_size * (cfg.data.max_length - 1), t.batch_size, max_length, packed=t.packing)
        return work, work, 0, [note]
    from ..data import prepare_data
    from ..models import load_tokenizer

    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    data = prepare_data(cfg, tok)
    examples = data.train
    lengths = [len(e["input_ids"]) for e in examples]
    steps = t.max_steps or math.ceil(t.epochs * math.ceil(len(examples) / (t.batch_size * t.grad_accum)))
    best = early = Workload(0, 0, 0, 0)
    for step, window in enumerate(epoch_windows(lengths, cfg, 0)[: max(1, min(steps, 64))]):
        if step == first:
            early = best
        for batch in step_batches(
            [examples[i] for i in window], t.batch_size, tok.pad_token_id, t.packing, cfg.data.max_length, "varlen"
        ):
            ids, labels = batch["input_ids"], batch["labels"]
            rows, width = ids.shape[0], ids.shape[1] + virtual
            if "cu_seq_lens_q" in batch:  # one packed row: its longest example is what attention sees
                width = int((batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).max()) + virtual
            tokens = ids.numel() + rows * virtual
            if tokens > best.tokens:
                packed = "cu_seq_lens_q" in batch
                best = Workload(tokens, int((labels[..., 1:] != -100).sum()), rows, width, packed)
    early = early if early.tokens else best  # a run of `first` steps or fewer
    return best, early, len(examples), [f"token lengths from {cfg.data.train} ({len(examples)} training examples)"]


def _training_bytes(terms: dict) -> int:
    """A breakdown's total without its load term: what a micro-batch's size moves."""
    return terms["total"] - terms.get("loading_excess", 0)


def estimate(
    cfg,
    nproc: int = 1,
    device=None,
    price_per_hour=None,
    price_per_kwh=None,
    baseline: bool = True,
    overhead: bool = True,
) -> dict:
    """The estimate report for a Config (before resolve: the method's defaults are filled here). `overhead=False`
    leaves the per-step overhead unmeasured (its calibration trains a shrunk model once per machine, method and
    precision): for callers that need the memory only."""
    import torch

    from ..device import keeps_step_memory, pick_device, resolve_precision
    from ..methods import get_method
    from ..training.resolve import resolve_run_config
    from .arith import preset_counts, preset_shape
    from .depth import COPY_STEPS, at_depth, depth_calibration
    from .energy import device_power, energy_cost
    from .overhead import step_overhead
    from .params import PRESETS, count_params, model_config, shape_of
    from .timing import step_flops, step_time

    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    method = get_method(cfg.method)
    teacher = None
    if cfg.distill is not None:  # the teacher's weights and forward; a student cut from it, by arithmetic
        from .distill import distill_setup

        cfg, config, teacher = distill_setup(cfg)
    labels = cfg.data.labels or (["a", "b"] if cfg.task == "classification" else None)
    cfg = resolve_run_config(cfg, method, labels if cfg.task == "classification" else None)
    device = device or pick_device()
    precision = resolve_precision(cfg.train.precision, device)
    arith = None
    if teacher is None and cfg.model in PRESETS:  # by arithmetic where it can: no transformers, no peft
        shape = preset_shape(cfg.model)
        arith = preset_counts(cfg, shape)
    if arith is not None:
        (counts, lora_inputs, adapted), adapters, config = arith, 0, None
    else:
        if teacher is None:
            config = model_config(cfg)
        shape = shape_of(config)
        counts, model = count_params(cfg, method, config)
        lora_layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")]
        lora_inputs = sum(m.in_features for _, m in lora_layers)
        adapted = [(n, m.out_features) for n, m in lora_layers]
        adapters = sum(1 for n, _ in model.named_modules() if n.endswith(".adapter"))
        del model

    def get_config():  # a preset's transformers config, built only when a calibration needs it
        return config if config is not None else model_config(cfg)

    quant_bits = None
    if hasattr(method, "quant_bits"):
        quant_bits = method.quant_bits(cfg)
    work, copies_work, n_examples, notes = workload(cfg, method, shape, cfg.model not in PRESETS, COPY_STEPS)
    base = 0
    if device.type == "cpu" and baseline:
        from .baseline import runtime_baseline

        base = runtime_baseline(cfg.model)  # measured QLoRA runs peak no higher than LoRA's: no bitsandbytes term
    ckpt = cfg.train.gradient_checkpointing

    fp32_outputs = lora_output_bytes(adapted)

    def mem(checkpointing, strategy="single", world=1, w=work, bits=quant_bits):
        terms = breakdown(
            shape, counts, cfg, method, precision, w, checkpointing, lora_inputs, adapters, bits, base, world, strategy,
            lora_fp32_outputs=fp32_outputs, cpu=device.type == "cpu",
        )  # fmt: skip
        if teacher is not None:
            from .distill import add_teacher_terms

            terms = add_teacher_terms(terms, teacher, shape, cfg, method, w)
        return with_load(terms, base, counts.total)

    t = cfg.train
    step_tokens_all = work.tokens * t.grad_accum  # the largest micro-batch, grad_accum times, per process
    selected = work.label_positions / max(work.tokens, 1)  # the LM head runs on label positions only (losses.py)
    # every weight's gradient for full; freeze computes those of its trainable blocks only, as an adapter does
    flops = step_flops(shape, counts, work, step_tokens_all, cfg.method == "full", ckpt, selected)
    if teacher is not None:
        from .distill import teacher_flops

        flops += teacher_flops(teacher, shape, step_tokens_all, work.label_positions * t.grad_accum)
    compute_s, rate = step_time(flops, precision, device)
    over = {"fixed_s": 0.0, "per_block_s": 0.0}
    depth, why = None, "asked for the memory only"
    if overhead:
        try:
            kept = keeps_step_memory(device, method)  # as the trainer decides: its copies keep it too
            depth, why = depth_calibration(cfg, get_config, shape, counts, kept)
        except Exception as exc:  # noqa: BLE001 - a run its shallow copies cannot train: the FLOPs model
            why = f"the shallow copies did not train ({type(exc).__name__}: {str(exc)[:120]})"
    if depth is not None:
        seconds = depth["fixed_s"] + depth["per_block_s"] * shape.layers
        overhead_s = max(0.0, seconds - compute_s)
        notes.append(
            f"step time measured on {depth['depths'][0]}- and {depth['depths'][1]}-block copies of this run "
            f"(random weights, its data, method and precision): {depth['fixed_s']:.3f} s + "
            f"{depth['per_block_s']:.3f} s per block"
            + (
                f"; {depth['timed_steps']} pairs of steps on the same data windows, back to back: the deeper "
                f"copy's time over the shallower one's spread {100 * depth['step_spread']:.0f}% (interquartile "
                "range: this machine's noise from step to step)"
                if depth.get("step_spread") is not None  # calibrations cached before it was recorded lack it
                else ""
            )
        )
    else:
        notes.append(f"step time from FLOPs and the per-step overhead ({why})")
        if overhead:
            try:
                over = step_overhead(cfg, method, get_config, shape.model_type, precision, device)
            except Exception as exc:  # noqa: BLE001 - an architecture the shrunk copy does not fit: FLOPs alone
                notes.append(f"per-step overhead not measured ({type(exc).__name__}): the time is FLOPs only, low")
        overhead_s = t.grad_accum * (over["fixed_s"] + over["per_block_s"] * shape.layers)
        seconds = compute_s + overhead_s
    memory = mem(ckpt)
    if depth is not None and base:  # a CPU's peak RSS: the copies' load and training peaks at this depth
        load = at_depth(depth, "load_peak_bytes", shape.layers)
        # training holds each block's weights (and a trainable one's gradient and moments) throughout: a deeper
        # model's training peak grows by at least that per block
        floor = block_state_bytes(counts, shape.layers, frozen_linear_bytes(cfg, method, precision, quant_bits))
        trained = at_depth(depth, "train_peak_bytes", shape.layers, floor)
        if load is not None and trained is not None:
            # no floor from the model's load term: a frozen fp32 base loads zero-copy from its safetensors (pages
            # resident only once the first forward reads them), so most runs peak in training, as their copies do
            # the copies train the run's first steps: a larger micro-batch later in the run adds what the model
            # says its extra tokens add (activations, loss buffers)
            later = max(0, _training_bytes(memory) - _training_bytes(mem(ckpt, w=copies_work)))
            measured = int(max(load, trained + later))
            memory = memory | {"copies_correction": measured - memory["total"], "total": measured}
            notes.append(
                f"peak memory measured on the same copies: loading {load / 2**20:,.0f} MiB, training "
                f"{trained / 2**20:,.0f} MiB at {shape.layers} blocks"
                + (
                    f" (the copies' peaks grew by less than the {floor / 2**20:,.1f} MiB a block that its weights "
                    "hold: that much a block taken from the deeper copy)"
                    if trained > at_depth(depth, "train_peak_bytes", shape.layers)
                    else ""
                )
                + (
                    f", + {later / 2**20:,.0f} MiB for the run's largest micro-batch ({work.tokens:,} tokens; the "
                    f"copies' first {COPY_STEPS} steps: {copies_work.tokens:,}) by the model"
                    if later
                    else ""
                )
                + " (the terms above are the model's breakdown; copies_correction is what the measurement adds to them)"
            )
    steps = t.max_steps or (
        max(1, math.ceil(t.epochs * math.ceil(n_examples / (t.batch_size * t.grad_accum)))) if n_examples else None
    )
    watts, power_source = device_power(device)
    report = {
        "model": cfg.model,
        "method": cfg.method,
        "device": device.type,
        "precision": precision,
        "architecture": vars(shape),
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_pct": 100.0 * counts.trainable / counts.total,
        "micro_batch": vars(work),
        "gradient_checkpointing": ckpt,
        "memory": memory,
        "memory_other_checkpointing": mem(not ckpt),
        "memory_baseline_kind": "peak RSS of the runtime before the model (measured, cached)" if base else "none",
        "step_flops": flops,
        "matmul_flops_per_s": rate,
        "step_seconds": seconds,
        "step_compute_seconds": compute_s,
        "step_overhead_seconds": overhead_s,
        "overhead_calibration": over,
        "depth_calibration": depth,
        "steps": steps,
        "run_seconds": seconds * steps if steps else None,
        "power_w": watts,
        "power_source": power_source,
        "notes": notes,
    }
    if teacher is not None:
        report["distill"] = {"teacher": teacher.name, "teacher_params": teacher.params, "cache": teacher.cache}
        if teacher.cache:
            notes.append("distill.cache: the teacher runs once before training (its weights are held then only)")
    if steps:
        report.update(energy_cost(seconds * steps, watts, price_per_hour, price_per_kwh))
    if nproc > 1:
        report["per_rank"] = {s: mem(ckpt, s, nproc) for s in STRATEGIES}
        report["nproc"] = nproc
    report["advice"] = advice(report, cfg, mem, free_memory(device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def free_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def advice(report: dict, cfg, mem, free: int) -> list[dict]:
    """When the predicted peak does not fit the free memory: what to change, with each change's predicted peak
    and `load_bound` where that peak is the model's load on a CPU (no training setting lowers it)."""
    peak = report["memory"]["total"]
    report["free_memory_bytes"] = free
    if not free or peak <= free:
        return []
    work = Workload(**report["micro_batch"])
    t, ckpt = cfg.train, report["gradient_checkpointing"]
    changes = []
    if t.batch_size > 1:
        half = replace(
            work, tokens=work.tokens // 2, label_positions=work.label_positions // 2, rows=max(1, work.rows // 2)
        )
        changes.append((f"train.batch_size={t.batch_size // 2} train.grad_accum={t.grad_accum * 2}", mem(ckpt, w=half)))
    if not ckpt:
        changes.append(("train.gradient_checkpointing=true", report["memory_other_checkpointing"]))
    if cfg.method in ("lora", "dora", "rslora", "pissa", "loraplus"):
        changes.append(("method=qlora (4-bit frozen base)", mem(ckpt, bits=4)))
    if cfg.data.max_length > 64:
        w = replace(
            work, tokens=work.tokens // 2, label_positions=work.label_positions // 2, seq_len=max(1, work.seq_len // 2)
        )
        changes.append((f"data.max_length={cfg.data.max_length // 2}", mem(ckpt, w=w)))
    return [  # none that raises the peak (QLoRA: its dequantized copies can outweigh the 4-bit base it saves)
        {"change": change, "peak_bytes": terms["total"], "load_bound": terms.get("loading_excess", 0) > 0}
        for change, terms in changes
        if terms["total"] <= peak
    ]


def probe(cfg, report: dict, steps: int = 3) -> dict:
    """Train `steps` real steps in a fresh process (its own peak RSS) and compare with the estimate."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        d = cfg.to_dict()
        d.update(out_dir=tmp, run_name="probe")
        d["train"] = dict(d["train"], max_steps=steps, eval_every=None, save_every=None)
        d["data"] = dict(d["data"], val_fraction=0.0) if not d["data"].get("eval") else d["data"]
        path = Path(tmp) / "probe.yaml"
        path.write_text(json.dumps(d), encoding="utf-8")  # JSON is YAML
        proc = subprocess.run(
            [sys.executable, "-m", "tunelab", "train", str(path), "--no-progress"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise UserError(f"--probe: the real steps failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        summary = json.loads((Path(tmp) / "probe" / "summary.json").read_text(encoding="utf-8"))
    step_s = summary["train_wall_s"] / max(summary["steps"], 1)  # step 1's warm-up included: a little high
    factor = step_s / report["step_seconds"] if report["step_seconds"] else 1.0
    return {
        "steps": summary["steps"],
        "peak_bytes": summary["peak_mem_bytes"],
        "peak_kind": summary["peak_mem_kind"],
        "step_seconds": step_s,
        "time_correction": factor,
        "run_seconds": step_s * report["steps"] if report["steps"] else None,
    }


def method_variant(cfg, name: str):
    """cfg with another method (that method's sections at their defaults)."""
    from ..config import SECTIONS, build_config
    from ..methods import METHODS

    d = cfg.to_dict()
    d["method"] = name
    for section in SECTIONS:
        if section not in METHODS[name].sections:
            d.pop(section, None)
    d["train"] = dict(d["train"], lr=None, packing=None)
    return build_config(d)
