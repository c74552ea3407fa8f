"""Resumable checkpoints in safetensors + JSON only (never pickle).

A checkpoint folder `checkpoints/step-N/` holds:
  trainable.safetensors   the trainable parameters
  optimizer.safetensors   optimizer state tensors; optimizer.json the rest (param groups)
  best.safetensors        the best evaluated step's trainable weights (when evaluation tracks a best)
  rng.safetensors         torch RNG states; trainer_state.json: step, data position, python/numpy RNG,
                          scheduler state, early-stopping state
  COMPLETE                written last; a folder without it is ignored (a crash mid-write)
It is written to a temporary folder, fsynced, then renamed into place. A sharded (FSDP) run writes
the same files: its tensors are gathered whole onto rank 0 first (sharding.py), so checkpoints move
freely between sharded and unsharded runs and process counts.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..io import atomic_write_json, fsync_dir, normal_modes, read_json_object, read_safetensors
from . import sharding
from .checkpoint_dirs import MARKER, complete_checkpoints


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable tensors on the CPU. Sharded: gathered whole on rank 0 ({} elsewhere; all ranks call)."""
    if sharding.is_sharded(model):
        return sharding.full_trainable_state(model)
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise UserError(
            f"checkpoint does not match the model: {len(missing)} trainable tensors missing, e.g. {missing[0]}"
        )
    if sharding.is_sharded(model):
        sharding.load_full_trainable_state(model, state)
        return
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _optimizer_state(optimizer, model) -> dict:
    """optimizer.state_dict(); sharded: gathered whole on rank 0 ({} elsewhere; all ranks call)."""
    return sharding.full_optimizer_state(model, optimizer) if sharding.is_sharded(model) else optimizer.state_dict()


def _optimizer_to_files(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for flat, value in tensors.items():
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for flat, value in meta.get("scalars", {}).items():
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _json_safe(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    save_total_limit: int | None = None,
    best_weights: dict | None = None,
    write: bool = True,
) -> Path | None:
    """Write checkpoints/step-N atomically; prune the oldest beyond save_total_limit, except the best step's. Sharded, every
    rank calls it (the tensors are gathered together) and only the one with `write` writes."""
    if not write and not sharding.is_sharded(model):
        return None
    weights = trainable_state(model)
    opt_state = _optimizer_state(optimizer, model)
    if not write:
        return None
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step-{step}."))
    try:
        save_file(weights, tmp / "trainable.safetensors")
        if best_weights is not None:  # the best evaluated step's weights survive a resume
            save_file(best_weights, tmp / "best.safetensors")
        opt_tensors, opt_meta = _optimizer_to_files(opt_state)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "optimizer.json", opt_meta)
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = dict(trainer_state, rng=rng_meta, scheduler=_json_safe(scheduler.state_dict()))
        atomic_write_json(tmp / "trainer_state.json", state)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        (tmp / MARKER).write_text(f"{step}\n")
        normal_modes(tmp)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if save_total_limit:
        best = trainer_state.get("best_step")
        for old in complete_checkpoints(ckpt_root)[:-save_total_limit]:
            if old.name != f"step-{best}":  # the best evaluated step's checkpoint stays (resume or inspect it)
                shutil.rmtree(old, ignore_errors=True)
    return final


def _load_safetensors(path: Path) -> dict:
    return read_safetensors(path, missing="missing from the checkpoint")


def _load_json(path: Path) -> dict:
    return read_json_object(path, missing="missing from the checkpoint")


def read_trainer_state(ckpt: Path) -> dict:
    return _load_json(ckpt / "trainer_state.json")


def load_best_weights(ckpt: Path) -> dict | None:
    path = ckpt / "best.safetensors"
    return _load_safetensors(path) if path.exists() else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG state; returns the trainer state."""
    load_trainable_state(model, _load_safetensors(ckpt / "trainable.safetensors"))
    opt = _optimizer_from_files(_load_safetensors(ckpt / "optimizer.safetensors"), _load_json(ckpt / "optimizer.json"))
    if sharding.is_sharded(model):
        sharding.load_full_optimizer_state(model, optimizer, opt)
    else:
        optimizer.load_state_dict(opt)
    state = _load_json(ckpt / "trainer_state.json")
    sched = scheduler.state_dict()
    sched.update(state.pop("scheduler"))
    scheduler.load_state_dict(sched)
    _set_rng_state(_load_safetensors(ckpt / "rng.safetensors"), state.pop("rng"))
    return state
