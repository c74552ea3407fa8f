"""Data-parallel training across processes started by `accelerate launch`, torchrun or `--nproc N`.

Every process holds the whole model and trains on its share of each optimizer step's examples;
after the step's backward passes one all-reduce sums the trainable gradients (DDP with no_sync
during accumulation does the same, bucket by bucket). Each process scales its loss by the loss-token
count of the whole global step, so the summed gradient equals the single-process one: the same run
gives the same numbers on 1 or N processes, and a checkpoint resumes under any process count.
Only rank 0 writes files. With `train.distributed: fsdp` the model is sharded instead (sharding.py):
FSDP reduces the gradients itself, and sum_gradients does nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # train.distributed: "ddp" (whole model per process) or "fsdp" (sharded)
    owns_group: bool = False  # this run started the process group (else a caller did: it stays up)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """FSDP over several processes (one process with `fsdp` trains unsharded, as one process does)."""
        return self.enabled and self.strategy == "fsdp"

    @classmethod
    def from_env(cls, strategy: str = "ddp") -> Distributed:
        """Join the process group a launcher described in the environment (WORLD_SIZE > 1), else single."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(strategy=strategy)
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        return cls(dist.get_rank(), dist.get_world_size(), local, strategy, owns)

    def device(self, default: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if default.type == "cuda" and self.enabled else default

    def shard(self, window: list[int]) -> list[int]:
        """This process's examples of a global step (strided: long and short examples spread evenly)."""
        return window[self.rank :: self.world]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """One all-reduce (sum) over all trainable gradients; a parameter without a gradient counts as zero."""
        if not self.enabled or self.sharded:  # FSDP has reduce-scattered them already
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.sum(float(flag))[0]) if self.enabled else flag

    def broadcast_str(self, text: str) -> str:
        """rank 0's string on every rank (as bytes: no pickle between processes)."""
        if not self.enabled:
            return text
        data = torch.tensor(list(text.encode()) if self.is_main else [], dtype=torch.uint8)
        size = torch.tensor([data.numel()])
        dist.broadcast(size, 0)
        if not self.is_main:
            data = torch.zeros(int(size), dtype=torch.uint8)
        dist.broadcast(data, 0)
        return bytes(data.tolist()).decode()

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's trainable weights."""
        if self.enabled:
            for p in params:
                dist.broadcast(p.data, 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
