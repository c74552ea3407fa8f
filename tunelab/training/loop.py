"""The training recipe, readable top to bottom: data -> model + method -> optimizer -> loop -> artifacts.

Gradient accumulation normalises by the loss-token count of the whole effective batch, so
`batch_size=2, grad_accum=4` gives the same gradients as `batch_size=8, grad_accum=1`.
Data order is a pure function of (seed, epoch), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import varlen_attention
from ..config import Config, apply_overrides, build_config, load_config
from ..data import prepare_data
from ..data.collate import example_loss_tokens
from ..device import (
    autocast_dtype,
    cpu_capability,
    keep_freed_memory,
    keeps_step_memory,
    peak_memory,
    pick_device,
    resolve_precision,
    restart_rss_peak,
    return_freed_memory,
    rss_peak_since_restart,
)
from ..errors import UserError
from ..estimate.energy import EnergyMeter
from ..eval.loss import evaluate_loss
from ..eval.metrics import lower_is_better
from ..eval.plots import write_plots
from ..io import atomic_write_json, atomic_write_text, dir_bytes, read_jsonl_objects, read_metrics
from ..log import log
from ..losses import loss_sum
from ..methods import get_method
from ..models import load_tokenizer
from ..reproducible import seed_everything, versions
from ..tracking import Tracking, check_available
from .accounting import count_params
from .batching import epoch_windows, packing_layout, step_batches
from .checkpoint import (
    load_best_weights,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from .checkpoint_dirs import latest_checkpoint
from .compiled import compile_blocks, resolve_compile
from .distributed import Distributed
from .frozen import lora_sums_in_fp32, shared_input_casts, store_frozen_at
from .fused_lora import fuse_lora_layers
from .fused_norm import fuse_rms_norms
from .fused_rope import fused_rotary, llama_rotary_modules
from .gated_mlp import fuse_gated_mlps
from .hints import curve_hints
from .lock import RunLock, remove_stale_temporaries
from .observer import RunObserver
from .oom import is_out_of_memory, oom_advice
from .optim import build_optimizer, build_scheduler, param_groups
from .resolve import resolve_run_config, resumed_grad_accum
from .resume import rebase_schedule, record_resume, resume_changes
from .run_dir import FAILURE_FILE, MetricsLog, check_out_dir, create_run_dir, save_artifact
from .sharding import check_shardable, even_micro_batches, prepare_model, state_bytes_per_rank, unsharded_model
from .signals import Interrupted, stop_on_signals
from .watchdog import Watchdog

MAX_BAD_STEPS = 5  # consecutive non-finite steps before giving up


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict


def total_steps(n_examples: int, cfg, world: int = 1) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps); a step takes batch_size x grad_accum x processes examples."""
    per_epoch = math.ceil(n_examples / (cfg.train.batch_size * cfg.train.grad_accum * world))
    if cfg.train.max_steps:
        return per_epoch, cfg.train.max_steps
    return per_epoch, max(1, math.ceil(cfg.train.epochs * per_epoch))


class Trainer:
    """Holds what the loop needs; `run()` is the loop."""

    def __init__(
        self,
        cfg: Config,
        resume_dir: Path | None = None,
        progress: bool = True,
        resume_changes: dict | None = None,
        observer: RunObserver | None = None,
    ):
        self.progress = progress
        self.observer = observer or RunObserver()
        self.dist = Distributed.from_env(cfg.train.distributed)
        self.lock = None
        self.run_dir = None
        self.tracking = None
        check_available(cfg.report_to)  # a tracker's missing package fails before any work
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.device = self.dist.device(pick_device())
        self.precision = resolve_precision(cfg.train.precision, self.device)
        check_shardable(cfg, self.precision)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        ckpt = grad_accum = None
        if resume_dir is not None:
            if self.dist.is_main:  # one trainer per run folder; then nothing else writes here
                self.lock = RunLock(resume_dir).acquire()
                (Path(resume_dir) / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure is being resumed from
                leftovers = remove_stale_temporaries(resume_dir)
                if leftovers:
                    log(
                        f"note: removed {len(leftovers)} temporary file(s) left by an interrupted write, e.g. {leftovers[0].name}"
                    )
            ckpt = latest_checkpoint(Path(resume_dir) / "checkpoints")
            if ckpt is None:
                raise UserError(f"{resume_dir}: no complete checkpoint to resume from")
            grad_accum = resumed_grad_accum(cfg, ckpt, self.dist.world)
            if grad_accum != cfg.train.grad_accum:
                before = cfg.train.batch_size * grad_accum * self.dist.world
                log(
                    f"note: {self.dist.world} process(es): train.grad_accum set to {grad_accum} to keep {before} "
                    "examples per step"
                )
        else:
            check_out_dir(cfg.out_dir)  # before any work: a folder that cannot hold the run
        # 1. data first: bad data fails before anything is written
        self.tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        self.data = prepare_data(cfg, self.tokenizer)
        for note in self.data.notes():
            log(f"note: {note}")

        # 2. the final config, once: from here on it is read-only
        self.method = get_method(cfg.method)
        self.kept_step_memory = False  # glibc told to keep freed memory (keep_step_memory); close() sets it back
        self.cfg = cfg = resolve_run_config(cfg, self.method, self.data.labels, grad_accum)

        # 3. model + method
        self.steps_per_epoch, self.total_steps = total_steps(len(self.data.train), cfg, self.dist.world)
        model = self.method.load_base(cfg, self.device)
        # the frozen base as stored in memory (QLoRA: packed 4-bit) vs the same weights in fp32
        self.base_footprint = {
            "base_footprint_bytes": int(model.get_memory_footprint()),
            "base_footprint_fp32_bytes": 4 * count_params(model)[1],
        }
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = self.method.apply(model, cfg, self.total_steps)
        self.model.train()
        low = autocast_dtype(self.precision)
        if low is not None and not self.dist.sharded and self.method.frozen_at_compute_dtype(cfg):
            # FSDP2 wants one dtype per sharded unit: a sharded base stays fp32
            cast = store_frozen_at(self.model, low)
            self.base_footprint["base_footprint_bytes"] -= cast * (4 - low.itemsize)
        # the hand-fused functions are for eager runs: inductor fuses a compiled block's elementwise ops itself
        # (compiling applies to single-process runs)
        eager = not resolve_compile(cfg.train.compile, self.device) or self.dist.enabled
        self.fused_lora = 0
        if eager and not self.dist.sharded:
            self.fused_lora = fuse_lora_layers(self.model)  # a plain LoRA layer as one autograd function
        if low is not None:  # an adapter's small update is not rounded to the bf16 base output's step
            lora_sums_in_fp32(self.model)
            shared_input_casts(self.model)  # base and lora_A read one bf16 copy of x, not two
        self.fused_mlps = fuse_gated_mlps(self.model)  # SiLU's output recomputed in backward, not saved
        self.fused_norms = fuse_rms_norms(self.model) if eager else 0  # RMSNorm as one function
        self.rotary_modules = llama_rotary_modules(self.model) if eager else []  # rotary embedding by halves
        self.layout = packing_layout(self.model) if cfg.train.packing else None
        self.dist.broadcast_parameters([p for p in self.model.parameters() if p.requires_grad])
        self.model = prepare_model(self.model, cfg, self.dist, self.device)  # fsdp: sharded from here on
        self.compiled_blocks = 0
        if resolve_compile(cfg.train.compile, self.device):
            if self.dist.enabled:
                log("note: train.compile applies to single-process runs; this one runs uncompiled")
            else:
                self.compiled_blocks = compile_blocks(self.model)

        # 4. optimizer and schedule
        self.groups = param_groups(self.model, cfg, self.method)
        self.optimizer = build_optimizer(self.model, cfg, self.method)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]  # this config's, before a checkpoint's
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        dtype = autocast_dtype(self.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext

        # 5. state, possibly restored from a checkpoint
        self.best_weights = None
        self.best_eval: dict | None = None  # the evaluation of the best step, this session (the final one reuses it)
        self.state = {
            "step": 0,
            "epoch": 0,
            "window": 0,
            "tokens": 0,
            "train_time": 0.0,
            "energy_j": 0.0,  # of the sessions before this one (a resumed run adds its own)
            "bad_steps": 0,
            "skipped_steps": 0,
            "best_metric": None,
            "best_step": None,
            "evals_since_best": 0,
            "examples_per_step": cfg.train.batch_size * cfg.train.grad_accum * self.dist.world,
            "last_loss": None,
        }
        if resume_dir is not None:
            self.run_dir = Path(resume_dir)
            self.state.update(load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler))
            if self.total_steps < self.state["step"]:  # before anything of the run is rewritten
                raise UserError(
                    f"{self.run_dir}: {self.state['step']} steps are taken (checkpoint {ckpt.name}); this config "
                    f"stops at {self.total_steps}: train.max_steps / train.epochs can only grow on resume"
                )
            rebase_schedule(self.optimizer, self.scheduler, base_lrs)  # a new train.lr or total applies from here
            self.best_weights = load_best_weights(ckpt)
            log(f"resuming {self.run_dir} from {ckpt.name}")
            if self.dist.is_main:  # only rank 0 writes and tracks
                self.tracking = Tracking(cfg, self.run_dir, resume_step=self.state["step"])
                self.metrics = MetricsLog(self.run_dir, resume_step=self.state["step"], tracking=self.tracking)
            else:
                self.metrics = None
            if resume_changes and self.dist.is_main:
                record_resume(self.run_dir, self.state["step"], resume_changes)
                atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
                for key, (old, new) in resume_changes.items():
                    log(f"note: resumed with {key} {old!r} -> {new!r} (from step {self.state['step'] + 1})")
        else:
            self.metrics = None
            if self.dist.is_main:  # only rank 0 writes
                self.run_dir = create_run_dir(cfg)
                self.lock = RunLock(self.run_dir).acquire()
                atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
                self.tracking = Tracking(cfg, self.run_dir)
                self.metrics = MetricsLog(self.run_dir, tracking=self.tracking)
            self.run_dir = Path(self.dist.broadcast_str(str(self.run_dir) if self.dist.is_main else ""))
        if self.dist.rank > 0:  # dropout differs between ranks; rank 0 keeps the single-process stream
            torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank + self.state["step"])
        self.train_time = self.state["train_time"]  # seconds in train_step, this session's and the ones before
        self.saved_step = self.state["step"] if resume_dir is not None else None
        self.pad_id = self.tokenizer.pad_token_id
        self.lengths = self.example_lengths(self.data.train)
        self.micro_batch = cfg.train.batch_size  # auto_batch_size may lower it; the step stays the same
        vocab = len(cfg.data.labels) if cfg.task == "classification" else getattr(self.model.config, "vocab_size", None)
        self.watchdog = Watchdog(math.log(vocab) if vocab and vocab > 1 else None)

    # --- one optimizer step -------------------------------------------------------------------
    def accumulate_gradients(self, window: list[int]) -> tuple[float, int]:
        """Forward/backward over the micro-batches of one step, each scaled by the window's loss-token
        count so the summed gradient equals the full batch's. Returns (mean token loss, tokens seen).
        Out of memory: with train.auto_batch_size the step is redone with half the micro-batch."""
        while True:
            oom = None
            try:
                total, n_loss_tokens = self._forward_backward(window)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raised
                if not is_out_of_memory(exc):
                    raise
                oom = exc
            if not self.dist.any(oom is not None):  # every rank retries together, or none does
                break
            self.optimizer.zero_grad(set_to_none=True)
            del oom
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if not (self.cfg.train.auto_batch_size and self.micro_batch > 1):
                raise UserError(oom_advice(self.cfg, self.micro_batch))
            self.micro_batch //= 2
            log(
                f"note: out of memory; micro-batch halved to {self.micro_batch} (grad_accum follows: same examples per step)"
            )
        tokens = sum(self.lengths[i] for i in window)
        self.dist.sum_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        total = self.dist.sum(total)[0]
        extra = self.method.extra_loss(self.model)  # once per step, not per micro-batch or per rank
        if extra is not None:
            (self.scaler.scale(extra) if self.scaler else extra).backward()
        return total / n_loss_tokens, tokens

    def _forward_backward(self, window: list[int]) -> tuple[float, int]:
        """This process's share of a step: (summed loss, loss tokens of the whole global step)."""
        n_loss_tokens = self.loss_normaliser([self.data.train[i] for i in window])
        batches = self.micro_batches([self.data.train[i] for i in self.dist.shard(window)])
        if self.dist.sharded:  # FSDP: as many forward/backward passes on every rank; a filler counts zero
            filler = batches[:1] or self.micro_batches([self.data.train[window[0]]])
            batches = even_micro_batches(batches, filler[0], self.dist)
        total = 0.0
        for batch in batches:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            # backward too: gradient checkpointing re-runs the forward there
            with varlen_attention(self.model, self.layout == "varlen"), fused_rotary(self.rotary_modules):
                with self.section("forward"), self.autocast():
                    s = self.batch_loss(batch)
                scaled = s / n_loss_tokens
                with self.section("backward"):
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(s.detach())
        return total, n_loss_tokens

    # --- what an objective defines (tunelab.training.preference replaces these for answer pairs) ----------
    def example_lengths(self, examples: list[dict]) -> list[int]:
        """Tokens per training example (throughput, length grouping)."""
        return [len(e["input_ids"]) for e in examples]

    def loss_normaliser(self, step_examples: list[dict]) -> int:
        """What a step's summed loss is divided by, from all its examples (every process's): loss tokens."""
        return sum(example_loss_tokens(e) for e in step_examples)

    def micro_batches(self, examples: list[dict]) -> list[dict]:
        """This process's examples of a step as micro-batches."""
        t = self.cfg.train
        return step_batches(examples, self.micro_batch, self.pad_id, t.packing, self.cfg.data.max_length, self.layout)

    def batch_loss(self, batch: dict) -> torch.Tensor:
        """The summed token loss of one micro-batch (a subclass may observe or replace it: the benchmark does)."""
        return loss_sum(self.model, batch)

    def step_record(self, loss: float, grad_norm: float, tokens: int, seconds: float) -> dict:
        """The metrics.jsonl record of the step just taken (counted in state and train_time)."""
        step = self.state["step"]
        return {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            # cumulative: the x-axes a comparison of runs can choose (tokens seen, training time)
            "tokens_seen": self.state["tokens"],
            "train_s": round(self.train_time, 3),
        } | self.step_metrics()

    def step_metrics(self) -> dict:
        """Extra metrics of the step just taken, for its metrics.jsonl record (the same call on every process)."""
        return {}

    def optimizer_step(self) -> float:
        """Clip, step (unless the gradients are non-finite), schedule; returns the gradient norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm or float("inf")))
        if self.scaler:  # the scaler skips non-finite steps itself and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        elif math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        if math.isfinite(grad_norm):
            self.method.on_step_end(self.model, self.state["step"] + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self, window: list[int]) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, grad_norm, tokens)."""
        loss, tokens = self.accumulate_gradients(window)
        with self.section("optimizer"):
            grad_norm = self.optimizer_step()
        return loss, grad_norm, tokens

    def timed_step(self, window: list[int]) -> tuple[float, float, int, float]:
        """train_step, timed and added to train_time: (loss, grad_norm, tokens, seconds)."""
        t0 = time.perf_counter()
        loss, grad_norm, tokens = self.train_step(window)
        seconds = time.perf_counter() - t0
        self.train_time += seconds
        return loss, grad_norm, tokens, seconds

    def section(self, name: str):
        """A part of a step (forward, backward, optimizer): the benchmark times these; nothing by default."""
        return contextlib.nullcontext()

    def evaluate(self) -> dict:
        return evaluate_loss(
            self.model, self.data.val, self.pad_id, self.cfg.train.batch_size, self.device, self.autocast()
        )

    def _track_best(self, metrics: dict) -> bool:
        """Update best-metric state; returns True when early stopping should stop the run."""
        key = self.cfg.train.metric_for_best
        if key not in metrics:
            return False
        value = metrics[key]
        best = self.state["best_metric"]
        if best is None or (value < best if lower_is_better(key) else value > best):
            self.state.update(best_metric=value, best_step=self.state["step"], evals_since_best=0)
            self.best_weights = trainable_state(self.model)
            self.best_eval = dict(metrics)
            return False
        self.state["evals_since_best"] += 1
        patience = self.cfg.train.early_stopping_patience
        return bool(patience and self.state["evals_since_best"] >= patience)

    def _final_eval(self, step: int, last_eval: dict) -> dict:
        """The evaluation of the final weights: the one already made of them this session (the restored best
        step's, or the last step's; evaluation is deterministic, so a repeat gives the same numbers), else a
        new one. Sharded training evaluates the unsharded copy anew."""
        if not self.dist.sharded:
            if self.best_weights is not None and self.state["best_step"] != step:
                if self.best_eval is not None and self.best_eval.get("step") == self.state["best_step"]:
                    return dict(self.best_eval)
            elif last_eval.get("step") == step:
                return dict(last_eval)
        return self.evaluate()

    def energy_j(self) -> float:
        """Joules used by this run so far (every session; tunelab.estimate.energy says how it is measured)."""
        return self.energy_before + self.energy.joules()

    def checkpoint(self) -> None:
        self.state["train_time"] = self.train_time
        self.state["energy_j"] = self.energy_j()
        self.saved_step = self.state["step"]
        if self.dist.is_main or self.dist.sharded:  # rank 0 writes; sharded, every rank gathers its part first
            save_checkpoint(
                self.run_dir / "checkpoints",
                self.state["step"],
                self.model,
                self.optimizer,
                self.scheduler,
                self.state,
                self.cfg.train.save_total_limit,
                self.best_weights,
                write=self.dist.is_main,
            )
        self.dist.barrier()

    def failed(self, reason: str) -> UserError:
        """Record why the run stopped (RUN/failure.json, for `tunelab runs`) and say where it can go on from."""
        ckpt = latest_checkpoint(self.run_dir / "checkpoints") if self.run_dir else None
        where = (
            f"; the last complete checkpoint is {ckpt} (tunelab train --resume {self.run_dir})"
            if ckpt
            else "; no checkpoint was written"
        )
        if self.dist.is_main and self.run_dir is not None:
            try:
                atomic_write_json(self.run_dir / FAILURE_FILE, {"error": reason, "step": self.state["step"]})
            except OSError:
                pass  # the folder refuses writes: the message below still says it
        return UserError(reason + (where if self.run_dir else ""))

    def close(self, status: str = "FAILED") -> None:
        """Release the run; `status` ends its tracking runs where finish() did not (FAILED, KILLED)."""
        if self.metrics is not None:
            self.metrics.close()
        if self.tracking is not None:
            self.tracking.close(status)
        if self.lock is not None:
            self.lock.release()
        self.dist.close()
        if self.device.type == "cpu":
            return_freed_memory()  # what training kept for its next step
            if self.kept_step_memory:
                keep_freed_memory(False)

    def keep_step_memory(self) -> bool:
        """On a CPU, have glibc keep what a step frees for the next step where the method frees whole weights'
        gradients each step (device.keep_freed_memory); close() sets it back."""
        kept = keeps_step_memory(self.device, self.method) and keep_freed_memory()
        self.kept_step_memory = self.kept_step_memory or kept
        return kept

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        trainable, total = count_params(self.model)
        log(f"run {self.run_dir}")
        log(
            f"model {cfg.model} | method {cfg.method} | device {self.device.type} ({cpu_capability() if self.device.type == 'cpu' else torch.cuda.get_device_name()}) | precision {self.precision}"
        )
        log(f"trainable params {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
        for g in self.groups:
            log(
                f"  lr group '{g['name']}': {g['numel']:,} params, lr {g['lr']:.3g}, weight_decay {g['weight_decay']:g}"
            )
        log(
            f"data: {len(self.data.train)} train / {len(self.data.val)} eval examples ({self.data.format}); "
            f"{self.total_steps} steps ({self.steps_per_epoch}/epoch), effective batch {t.batch_size * t.grad_accum * self.dist.world}"
            + (f" over {self.dist.world} processes" if self.dist.enabled else "")
            + (", packed" if t.packing else "")
        )

        # on a CPU, the peak RSS of loading and of training apart (the estimator extrapolates both from copies)
        self.load_peak = None
        if self.device.type == "cpu":
            return_freed_memory()  # what loading freed, so the training peak is training's own
            self.load_peak = restart_rss_peak()
            self.keep_step_memory()
        if self.dist.is_main:
            self.observer.started(self.run_dir)
        self.energy_before, self.energy = self.state.get("energy_j", 0.0), EnergyMeter(self.device)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.state["step"],
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
            )
        stop_reason = None
        last_eval: dict = {}
        with stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
            if bar is not None:
                cleanup.callback(bar.close)
            while self.state["step"] < self.total_steps and stop_reason is None:
                windows = epoch_windows(self.lengths, cfg, self.state["epoch"], self.dist.world)
                while self.state["window"] < len(windows) and self.state["step"] < self.total_steps:
                    loss, grad_norm, tokens, dt = self.timed_step(windows[self.state["window"]])
                    self.state["window"] += 1
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        self.state["bad_steps"] += 1
                        self.state["skipped_steps"] += 1
                        log(f"step {self.state['step'] + 1}: non-finite loss/gradient, step skipped")
                        if self.state["bad_steps"] >= MAX_BAD_STEPS:
                            raise UserError(
                                f"{MAX_BAD_STEPS} steps in a row had non-finite loss or gradients: the learning rate "
                                f"({t.lr:g}) is likely too high, or fp16 overflowed; lower train.lr or use bf16/fp32"
                            )
                        continue
                    self.state["bad_steps"] = 0
                    self.state["step"] += 1
                    self.state["tokens"] += tokens
                    self.state["last_loss"] = loss
                    step = self.state["step"]
                    record = None
                    if step % t.log_every == 0 or step == self.total_steps:
                        record = self.step_record(loss, grad_norm, tokens, dt)
                    if t.eval_every and step % t.eval_every == 0 and self.data.val:
                        last_eval = self.evaluate() | {"step": step}
                        record = (record or {"step": step}) | last_eval
                        if self._track_best(last_eval):
                            stop_reason = f"early stopping: {t.metric_for_best} did not improve for {t.early_stopping_patience} evaluations"
                        stop_reason = stop_reason or self.observer.evaluated(step, last_eval)
                    if record and self.metrics:
                        self.metrics.write(record)
                    stopped = self.watchdog.check(step, loss, grad_norm)
                    if stopped:
                        raise UserError(
                            f"{stopped}; train.lr {t.lr:g} is likely too high (the method's default is "
                            f"{self.method.default_lr:g}): lower it, or add warmup (train.warmup_ratio)"
                        )
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:.0f}" if dt > 0 else "-")
                    if t.save_every and step % t.save_every == 0:
                        self.checkpoint()
                    signal_name = stop.signal_name
                    if self.dist.any(signal_name is not None):  # all ranks stop at the same step
                        signal_name = signal_name or "SIGTERM"
                        self.checkpoint()
                        if self.metrics:
                            self.metrics.close()
                        raise Interrupted(signal_name, self.run_dir, step)
                    if stop_reason:
                        break
                if self.state["window"] >= len(windows):
                    self.state["epoch"] += 1
                    self.state["window"] = 0
        if stop_reason:
            log(stop_reason)
        return self.finish(trainable, total, last_eval, stop_reason)

    def finish(self, trainable: int, total: int, last_eval: dict, stop_reason: str | None = None) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        step = self.state["step"]
        if self.saved_step != step:
            self.checkpoint()
        state_bytes = state_bytes_per_rank(self.model, self.optimizer, self.dist)
        if self.dist.sharded:  # rank 0 evaluates and saves an unsharded copy, as one process would
            self.model = unsharded_model(self.model, self.method, cfg, self.device, self.total_steps, self.dist)
        if not self.dist.is_main:
            return TrainResult(self.run_dir, {})
        # the final artifact is the best evaluated state when periodic eval ran
        if self.best_weights is not None and self.state["best_step"] != step:
            load_trainable_state(self.model, self.best_weights)
            log(
                f"restored the best step {self.state['best_step']} ({t.metric_for_best}={self.state['best_metric']:.4f})"
            )
        final_eval = self._final_eval(step, last_eval) if self.data.val else {}
        if final_eval:
            final_eval["step"] = self.state["best_step"] if self.best_weights is not None else step
            atomic_write_json(self.run_dir / "eval.json", final_eval)
        artifact = save_artifact(self.method, self.model, self.run_dir, self.tokenizer)
        self.metrics.close()
        hints = curve_hints(read_metrics(self.run_dir / "metrics.jsonl"))
        peak, kind = peak_memory(self.device)
        summary = {
            "method": cfg.method,
            "model": cfg.model,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_pct": 100.0 * trainable / total,
            "artifact": artifact.name,
            "artifact_bytes": dir_bytes(artifact),
            "steps": step,
            "skipped_steps": self.state["skipped_steps"],
            "micro_batch_size": self.micro_batch,
            "best_step": self.state["best_step"],
            "stop_reason": stop_reason,  # why it ended before train.max_steps (early stopping, pruned); None: it did not
            "train_wall_s": self.train_time,
            "train_tokens": self.state["tokens"],
            "train_tokens_per_s": self.state["tokens"] / self.train_time if self.train_time > 0 else 0.0,
            "peak_mem_bytes": peak,
            "peak_mem_kind": kind,
            "load_peak_mem_bytes": self.load_peak,
            "train_peak_mem_bytes": rss_peak_since_restart() if self.load_peak is not None else None,
            "energy_kwh": self.energy_j() / 3.6e6,
            "energy_source": self.energy.source,
            **self.base_footprint,
            **state_bytes,
            "final_train_loss": self.state["last_loss"],
            "eval": final_eval,
            "device": self.device.type if self.device.type == "cpu" else torch.cuda.get_device_name(),
            "cpu_capability": cpu_capability(),
            "precision": self.precision,
            "compiled_blocks": self.compiled_blocks,
            "fused_mlps": self.fused_mlps,
            "freed_memory_kept": self.kept_step_memory,
            "hints": hints,
            "config_hash": cfg.hash(),
            "versions": versions(),
            "resumes": read_jsonl_objects(self.run_dir / "resumes.jsonl"),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        write_plots(self.run_dir)
        self.tracking.finish(summary, artifact)
        log(
            f"done: {step} steps, final train loss {summary['final_train_loss']:.4f}"
            + (f", eval loss {final_eval['eval_loss']:.4f}" if final_eval else "")
            + f", {summary['train_tokens_per_s']:.0f} tokens/s, peak {kind} {peak / 2**20:.0f} MiB"
        )
        for hint in hints:
            log(f"hint: {hint}")
        return TrainResult(self.run_dir, summary)


def trainer_for(cfg) -> type[Trainer]:
    """The Trainer of this config's objective: a distillation's, answer pairs', or next tokens'."""
    if cfg.distill is not None:
        from .distill import DistillTrainer

        return DistillTrainer
    if cfg.task == "preference":
        from .preference import PreferenceTrainer

        return PreferenceTrainer
    return Trainer


def train(
    config,
    overrides: list[str] | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    observer: RunObserver | None = None,
) -> TrainResult:
    """Train from a Config, a dict, or a YAML path (plus dotted overrides). Returns the run dir and summary.

    With `resume`, the run's saved config.yaml is used (overrides still apply) and training continues from
    its latest complete checkpoint. `observer` hears of the run's folder and its evaluations (and may stop it).
    """
    changes = None
    if resume is not None:
        resume = Path(resume)
        if not (resume / "config.yaml").exists():
            raise UserError(f"{resume}: not a run directory (no config.yaml)")
        cfg = load_config(resume / "config.yaml", overrides, saved_run=True)
        changes = resume_changes(load_config(resume / "config.yaml", saved_run=True), cfg)
    elif config is None or isinstance(config, str | Path):
        cfg = load_config(config, overrides)
    else:
        data = config.to_dict() if isinstance(config, Config) else copy.deepcopy(dict(config))
        cfg = build_config(apply_overrides(data, overrides or []))
    if cfg.distill is not None:
        from ..distill import with_student

        cfg = with_student(cfg) if resume is None else cfg
        if cfg.distill.prompts:
            from ..distill.answers import write_answers

            write_answers(cfg, progress)
    trainer = trainer_for(cfg)(cfg, resume_dir=resume, progress=progress, resume_changes=changes, observer=observer)
    status = "FAILED"  # what the trackers record when the run does not finish
    try:
        return trainer.run()
    except Interrupted:
        status = "KILLED"
        raise
    except OSError as exc:  # a write into the run folder failed: read-only, disk full, permissions
        raise trainer.failed(
            f"{exc.filename or trainer.run_dir}: {exc.strerror or exc} (writing the run); "
            f"training stopped at step {trainer.state['step']}"
        ) from None
    except UserError as exc:
        raise trainer.failed(str(exc)) from None
    finally:
        trainer.close(status)
