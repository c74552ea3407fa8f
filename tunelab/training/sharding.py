"""Sharded data parallel (`train.distributed: fsdp`, `tunelab train --shard`): FSDP2 `fully_shard`.

Each of N processes keeps 1/N of every parameter (trainable or frozen), gradient and optimizer state;
a decoder block's weights are all-gathered just for its forward and backward, and its gradients are
reduce-scattered (summed, not averaged: each rank's loss is already divided by the loss-token count
of the whole global step, as under data parallel). So a run gives the numbers of one process.

Checkpoints keep the one-process format: the trainable weights and the optimizer state are gathered
whole onto rank 0, which writes them; loading gives each rank its slice of the whole tensors. A
sharded checkpoint therefore resumes in one process and the other way round. At the end of a run,
rank 0 rebuilds an unsharded model from the gathered weights for the final evaluation and the artifact.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from ..errors import ConfigError
from ..log import log
from ..losses import SHARDED_LOSS, selected_loss_sum

# why a method (or setting) cannot run sharded; every other method trains as one process would
_REFUSED = {
    "qlora": "its 4-bit bitsandbytes base weights cannot be split into DTensor shards",
    "adalora": "its rank allocator reads the whole lora_E/A/B matrices and their gradients after every step",
}


def check_shardable(cfg, precision: str) -> None:
    """A ConfigError naming `train.distributed` when this run cannot be sharded."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # `accelerate launch --use_fsdp`
        if cfg.train.distributed != "fsdp":
            raise ConfigError(
                "accelerate launch --use_fsdp: tunelab shards the model itself and reads no accelerate FSDP "
                "settings; set train.distributed: fsdp (or add --shard) and leave out --use_fsdp"
            )
        log("note: accelerate's fsdp_* settings are not read: tunelab shards each decoder block (FSDP2)")
    if cfg.train.distributed != "fsdp":
        return
    from ..methods import get_method

    what, reason = f"method '{cfg.method}'", _REFUSED.get(cfg.method)
    quant_bits = getattr(get_method(cfg.method), "quant_bits", lambda _: None)(cfg)
    if reason is None and quant_bits:
        reason = f"quant.bits={quant_bits}: quantized base weights cannot be split into DTensor shards"
    if reason is None and cfg.task == "preference":
        what, reason = (
            "task: preference",
            "its sequence log-probs call the decoder past the sharded root; not done here",
        )
    if reason is None and precision == "fp16":
        what, reason = "precision fp16", "it needs a gradient scaler over sharded gradients, not done here; use bf16"
    if reason:
        raise ConfigError(
            f"train.distributed: fsdp does not work with {what}: {reason}; use train.distributed: ddp (data parallel)"
        )


def is_sharded(model) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def prepare_model(model, cfg, dist, device: torch.device):
    """The model to train: sharded over the processes under `fsdp` (one process: left whole, as it is)."""
    if dist.sharded:
        return shard_model(model, device, dist.world)
    if cfg.train.distributed == "fsdp":
        log("note: train.distributed fsdp in one process: nothing to shard, the model trains whole")
    return model


def shard_model(model, device: torch.device, world: int):
    """fully_shard each transformer block, then the root (embeddings, final norm, head: tied weights
    stay in one unit). Returns the same module, now an FSDPModule with DTensor parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from ..methods.full import transformer_blocks

    mesh = init_device_mesh(device.type, (world,))
    try:
        _, blocks = transformer_blocks(model)
    except ConfigError:
        blocks = []  # no block list found: the whole model is one unit (sharded at rest, whole in forward)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is already scaled for the global step
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    # the loss calls the decoder and the head directly: register it so the root's weights are gathered
    setattr(model, SHARDED_LOSS, functools.partial(selected_loss_sum, model))
    register_fsdp_forward_method(model, SHARDED_LOSS)
    return model


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]  # tied weights once, as one process


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """The whole trainable tensors on rank 0's CPU ({} on other ranks). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))
    return {n: full[n].contiguous() for n in _trainable_names(model) if n in full}


def load_full_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Each rank keeps its slice of the whole tensors in `state` (every rank passes the same)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=False))


def _optimizer_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of a one-process state_dict is names[i]."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model, optimizer) -> dict:
    """optimizer.state_dict() of one process (integer keys, whole tensors) on rank 0; {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not full.get("state"):
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    groups, start = [], 0
    for group in full["param_groups"]:
        groups.append(dict(group, params=list(range(start, start + len(group["params"])))))
        start += len(group["params"])
    return {"state": {index[name]: s for name, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model, optimizer, state_dict: dict) -> None:
    """Load a one-process optimizer state_dict (integer keys, whole tensors) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _optimizer_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state_dict["state"].items()}, "param_groups": []}
    for group in state_dict["param_groups"]:
        by_name["param_groups"].append(dict(group, params=[names[i] for i in group["params"]]))
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor holds its shard
    return local.numel() * local.element_size()


def state_bytes_per_rank(model, optimizer, dist) -> dict:
    """Bytes of parameters (trainable and frozen) and of optimizer state one process holds (the
    largest over ranks): 1/N of one process's under FSDP, all of it otherwise."""
    params = {id(p): p for p in model.parameters()}.values()
    param_bytes = sum(_local_bytes(p) for p in params)
    opt_bytes = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    most = dist.max(param_bytes, opt_bytes)
    return {"param_bytes_per_rank": int(most[0]), "optimizer_bytes_per_rank": int(most[1])}


def even_micro_batches(batches: list[dict], filler: dict, dist) -> list[dict]:
    """Under FSDP every forward and backward is a collective, so every rank runs as many micro-batches:
    a rank with fewer (a short last step, packing) adds passes of `filler` whose loss counts zero."""
    most = int(dist.max(len(batches))[0])
    return batches + [dict(filler, loss_weight=0.0)] * (most - len(batches))


def unsharded_model(model, method, cfg, device: torch.device, total_steps: int, dist):
    """Rank 0: the method's model built afresh, unsharded, holding the sharded model's trained weights
    (the final evaluation and the artifact then run as in one process); other ranks: None. The frozen
    weights need no gathering: a fresh build has them, as a resumed run does."""
    from .checkpoint import load_trainable_state

    state = full_trainable_state(model)
    if not dist.is_main:
        return None
    plain = method.apply(method.load_base(cfg, device), cfg, total_steps)
    load_trainable_state(plain, state)
    plain.train()
    return plain
