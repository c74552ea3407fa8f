"""A small dynamic batcher: one worker thread runs every forward pass.

Requests wait in a queue; the worker takes the oldest, waits up to `max_wait_s` for more that can share
its forward pass (the same group: any mix of base and LoRA rows on the shared base, else the same
handle), up to `max_batch_size` rows, and decodes them together until the last one finishes. Changes
to the model (loading or freeing an adapter) run on the same thread between two steps, so no forward
pass ever sees a half-loaded adapter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .adapters import AdapterHandle
from .decode import BatchDecode, Sequence


class QueueFull(Exception):
    pass


@dataclass
class Update:
    """What a job's consumer sees after a step: per sequence (text, finish_reason, tokens generated)."""

    states: list[tuple[str, str | None, int]]
    done: bool = False
    error: str | None = None
    result: object = None


@dataclass(eq=False)
class Job:
    """One request's work, bound to `handle` for its whole life. Updates arrive on `updates` (asyncio)."""

    handle: AdapterHandle
    seqs: list[Sequence] = field(default_factory=list)
    classify_ids: list[list[int]] | None = None  # a classification request's inputs
    loop: asyncio.AbstractEventLoop | None = None
    updates: asyncio.Queue | None = None
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False

    @property
    def rows(self) -> int:
        return len(self.classify_ids) if self.classify_ids is not None else len(self.seqs)

    def cancel(self) -> None:
        """From any thread: the worker drops the job's rows at its next step."""
        self.cancelled = True
        for seq in self.seqs:
            seq.cancelled = True

    def publish(self, done: bool = False, error: str | None = None, result=None) -> None:
        update = Update([(s.text, s.finish_reason, len(s.generated)) for s in self.seqs], done, error, result)
        if self.loop is not None and self.updates is not None:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, update)


class Batcher:
    def __init__(
        self,
        registry,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        max_queue: int = 256,
        on_batch: Callable[[int, int, float], None] | None = None,
    ):
        self.registry = registry
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.on_batch = on_batch  # (rows, tokens, seconds) after each batch, for the metrics
        self.step_hook: Callable[[], None] | None = None  # called after each decoding step (tests hold a step here)
        self._queue: deque[Job] = deque()
        self._controls: deque[tuple[Callable, Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = False
        self._batch: BatchDecode | None = None
        self._batch_jobs: list[Job] = []
        self._batch_tokens, self._batch_start = 0, 0.0
        registry.run_on_worker = self.call

    # --- from the server's threads
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tunelab-serve-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def pause(self) -> None:
        """Hold decoding after the current step (requests stay queued or mid-way; loads and unloads still run)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def queue_depth(self) -> int:
        return len(self._queue)

    def running_rows(self) -> int:
        batch = self._batch
        return len(batch.active) if batch is not None else 0

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify_all()

    def call(self, fn: Callable):
        """Run `fn` on the worker thread between two forward passes and return its result (its exception)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            return fn()
        future: Future = Future()
        with self._cond:
            self._controls.append((fn, future))
            self._cond.notify_all()
        return future.result()

    # --- on the worker thread
    def _run(self) -> None:
        while not self._stopping:
            self._run_controls()
            if self._paused:
                with self._cond:
                    if self._paused and not self._controls and not self._stopping:
                        self._cond.wait(timeout=0.5)
            elif self._batch is None:
                jobs = self._next_jobs()
                if jobs:
                    self._start(jobs)
            else:
                self._step()

    def _run_controls(self) -> None:
        while self._controls:
            with self._cond:
                fn, future = self._controls.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who reports it
                future.set_exception(exc)

    def _next_jobs(self) -> list[Job]:
        with self._cond:
            while not self._queue and not self._controls and not self._stopping and not self._paused:
                self._cond.wait(timeout=0.5)
            if not self._queue or self._controls or self._paused:
                return []
            group = self._queue[0].handle.group
            deadline = self._queue[0].enqueued + self.max_wait_s
            while (
                sum(j.rows for j in self._queue if j.handle.group == group) < self.max_batch_size
                and not self._controls
                and not self._stopping
                and (left := deadline - time.monotonic()) > 0
            ):
                self._cond.wait(timeout=left)
            taken, rows = [], 0
            for job in list(self._queue):
                if job.handle.group != group:
                    continue
                if taken and (rows + job.rows > self.max_batch_size or job.classify_ids is not None):
                    break
                taken.append(job)
                rows += job.rows
                if job.classify_ids is not None:
                    break  # a classification request is one forward pass of its own
            for job in taken:
                self._queue.remove(job)
        live = []
        for job in taken:
            if job.cancelled:
                self._finish(job)
            else:
                live.append(job)
        return live

    def _start(self, jobs: list[Job]) -> None:
        handle = jobs[0].handle
        try:
            if jobs[0].classify_ids is not None:
                self._classify(jobs[0])
                return
            if handle.kind == "own":
                model, tokenizer, mixed = handle.model, handle.tokenizer, False
            else:
                model, tokenizer = self.registry.base.model, self.registry.base.tokenizer
                mixed = handle.kind != "solo"
                if handle.kind == "solo":
                    model.set_adapter(handle.slot)
            seqs = [s for job in jobs for s in job.seqs]
            self._batch = BatchDecode(model, tokenizer, seqs, mixed=mixed)
            self._batch_jobs, self._batch_tokens, self._batch_start = jobs, 0, time.perf_counter()
        except Exception as exc:  # a failing batch fails its requests, not the server
            for job in jobs:
                self._finish(job, error=f"{type(exc).__name__}: {exc}")
            self._batch = None

    def _step(self) -> None:
        try:
            advanced = self._batch.step()
        except Exception as exc:
            for job in self._batch_jobs:
                self._finish(job, error=f"{type(exc).__name__}: {exc}")
            self._batch = None
            return
        self._batch_tokens += len(advanced)
        touched = {id(s) for s in advanced}
        for job in self._batch_jobs:
            if job.finished:
                continue
            if all(s.finished for s in job.seqs):
                self._finish(job)
            elif any(id(s) in touched for s in job.seqs):
                job.publish()
        if self._batch.done:
            if self.on_batch is not None:
                rows = sum(j.rows for j in self._batch_jobs)
                self.on_batch(rows, self._batch_tokens, time.perf_counter() - self._batch_start)
            self._batch, self._batch_jobs = None, []
        if self.step_hook is not None:
            self.step_hook()

    @torch.no_grad()
    def _classify(self, job: Job) -> None:
        from ..data.collate import pad_batch

        model, tokenizer = job.handle.model, job.handle.tokenizer
        device = next(model.parameters()).device
        batch = pad_batch([{"input_ids": ids, "labels": ids} for ids in job.classify_ids], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()
        self._finish(job, result=logits.softmax(-1).cpu().tolist())

    def _finish(self, job: Job, error: str | None = None, result=None) -> None:
        if job.finished:
            return
        job.finished = True
        for seq in job.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "cancelled" if job.cancelled else "error"
        self.registry.release(job.handle)
        job.publish(done=True, error=error, result=result)
