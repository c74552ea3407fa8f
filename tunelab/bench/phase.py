"""One benchmark phase in a process of its own, so its peak memory (ru_maxrss) is its own:

python -m tunelab.bench.phase baseline|fast --spec SPEC.json --out RESULT.json [--turns GO_FD,DONE_FD]

With --turns it runs only while it holds the turn the parent hands it (bench/turns.py).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from ..device import peak_memory, pick_device
from ..eval.loss import evaluate_loss
from ..io import atomic_write_json
from ..training.accounting import count_params
from .steps import StepLog, log
from .turns import Turns


def run_phase(name: str, spec: dict, turns: Turns | None = None) -> dict:
    if name == "baseline":
        from .baseline import train_baseline as train
    else:
        from .fast import train_fast as train
    from .run import matmul_peak_flops

    device = pick_device()
    # the machine's speed before and after this phase: on a shared machine it drifts, and a drift
    # between the phases moves the speedup without either trainer changing
    probe_before = matmul_peak_flops("fp32", device, size=1024)
    profile = str(Path(spec["profile_dir"]) / f"bench-profile-{name}.txt") if spec.get("profile_dir") else None
    step_log = StepLog(name, spec["steps"], profile_path=profile, turns=turns)
    model = train(spec, step_log)
    # the peak of training, before the held-out evaluation can add to it
    peak, kind = peak_memory(next(model.parameters()).device)
    probe_after = matmul_peak_flops("fp32", device, size=1024)
    # counted on the model as trained: the fast phase's reloaded copy below is frozen for evaluation, and
    # would count its adapter as base parameters (and inflate its MFU)
    trainable, total = count_params(model)  # tied weights once
    if name == "fast":
        from .fast import trained_model

        del model
        gc.collect()
        model = trained_model(step_log)
    result = step_log.summary(spec["warmup_steps"], torch.get_num_threads())
    # the trained model's mean token loss on a fixed held-out set: the same evaluation code for both phases
    result["heldout_loss"] = evaluate_loss(model, spec["heldout"], spec["pad_id"], batch_size=1)["eval_loss"]
    base_params = total - trainable
    result.update(
        peak_mem_bytes=peak,
        peak_mem_kind=kind,
        # the peak before the first step (model loaded, adapter attached): what training adds is the rest
        peak_mem_before_train_bytes=step_log.peak_before_train[0],
        precision=step_log.notes.pop("precision", "fp32"),
        base_params=base_params,
        trainable_params=trainable,
        init_adapter_checksum=step_log.init_checksum,
        matmul_probe_flops_per_s={"before": probe_before, "after": probe_after},
        notes=step_log.notes,
        profile_table=profile,
    )
    if name == "fast":  # what tunelab's loop itself reported: its examples per step and its token count
        result["step_indices"] = [s["indices"] for s in step_log.steps]
        result["loop_reported_tokens"] = [s["loop_tokens"] for s in step_log.steps]
    log(
        f"[{name}] {result['useful_tokens_per_s']:.0f} useful tok/s, final loss {result['final_train_loss']:.4f}, "
        f"held-out loss {result['heldout_loss']:.4f}, peak {kind} {peak / 2**20:.0f} MiB"
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.bench.phase")
    parser.add_argument("phase", choices=["baseline", "fast"])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--turns", help="GO_FD,DONE_FD: run by turns with the other phase")
    args = parser.parse_args(argv)
    spec = json.loads(open(args.spec, encoding="utf-8").read())
    turns = Turns(args.turns) if args.turns else None
    if turns:
        turns.pass_turn()  # ready: wait for the first turn
    atomic_write_json(args.out, run_phase(args.phase, spec, turns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
