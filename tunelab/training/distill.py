"""The training loop of a distillation run (a `distill` section): the same recipe, another loss.

Only the loop's loss hooks change: each micro-batch's loss is the KD loss of tunelab.distill.loss, summed over
its label tokens (or examples), so accumulation, packing and processes normalise it as plain fine-tuning's.
The teacher runs on the same micro-batch without gradients, inside the run's autocast (its compute
precision), or its logits come from the run's cache (distill.cache). At the end the teacher is measured on
the same validation split, and summary.json holds both side by side, with the teacher as the run's parent.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..attention import varlen_attention
from ..distill.cache import CACHE_DIR, INFO_FILE, TeacherCache, write_cache
from ..distill.loss import kd_sums
from ..distill.teacher import check_compatible, load_teacher
from ..eval.loss import evaluate_loss
from ..io import atomic_write_json
from .accounting import count_params
from .batching import step_groups
from .loop import Trainer


class DistillTrainer(Trainer):
    """Trainer whose loss is the KD loss against `cfg.distill.teacher`."""

    def __init__(self, cfg, resume_dir=None, **kwargs):
        check_compatible(cfg)  # before anything is written: a teacher of another vocabulary is a config error
        super().__init__(cfg, resume_dir=resume_dir, **kwargs)
        self.options = self.cfg.distill
        self.teacher = load_teacher(self.cfg, self.device)
        self.cache = None
        self._index = {id(e): i for i, e in enumerate(self.data.train)}
        self._sums = [0.0, 0.0, 0.0]
        self._pairs = None
        if self.options.hidden_weight:  # which teacher hidden state each student block's output should match
            from ..distill.loss import block_pairs
            from ..methods.full import transformer_blocks

            self._pairs = block_pairs(len(transformer_blocks(self.teacher)[1]), self.options.keep_every)
        if self.options.cache:
            if not (self.run_dir / CACHE_DIR / INFO_FILE).is_file():  # the teacher is fixed: recomputing is exact
                if self.dist.is_main:
                    write_cache(
                        self.run_dir,
                        self.teacher,
                        self.data.train,
                        self.options,
                        self.cfg.train.batch_size,
                        self.pad_id,
                        self.device,
                        self.autocast,
                    )
                self.dist.barrier()
            self.cache = TeacherCache(self.run_dir, len(self.data.train), self.options)
            self.teacher = None  # loaded again for the final comparison only

    # --- the loop's hooks ---------------------------------------------------------------------
    def loss_normaliser(self, step_examples: list[dict]) -> int:
        self._sums = [0.0, 0.0, 0.0]  # a step redone after out-of-memory starts again
        self._step_tokens = super().loss_normaliser(step_examples)
        return self._step_tokens

    def micro_batches(self, examples: list[dict]) -> list[dict]:
        batches = super().micro_batches(examples)
        if self.cache is not None:  # each micro-batch carries its examples' cached logits, in its token order
            t = self.cfg.train
            for batch, group in zip(
                batches, step_groups(examples, self.micro_batch, t.packing, self.cfg.data.max_length)
            ):
                batch["teacher"] = self.cache.lookup([self._index[id(examples[i])] for i in group], "cpu")
        return batches

    def batch_loss(self, batch: dict) -> torch.Tensor:
        if self.cache is not None:
            teacher = batch["teacher"]
            teacher = (
                tuple(x.to(self.device) for x in teacher) if isinstance(teacher, tuple) else teacher.to(self.device)
            )
            sums = kd_sums(self.model, batch, teacher, self.options.temperature, self.options.alpha)
        else:
            o = self.options
            with varlen_attention(self.teacher, "cu_seq_lens_q" in batch):
                sums = kd_sums(
                    self.model,
                    batch,
                    self.teacher,
                    o.temperature,
                    o.alpha,
                    o.hidden_weight,
                    self._pairs,
                    o.kd_positions == "all",
                )
        self._sums[0] += sums.kl_sum
        self._sums[1] += sums.ce_sum
        self._sums[2] += sums.hidden_sum
        return sums.total

    def step_metrics(self) -> dict:
        kl, ce, hidden = self.dist.sum(*self._sums)
        out = {"kd_kl": kl / self._step_tokens, "kd_ce": ce / self._step_tokens}
        if self.options.hidden_weight:
            out["kd_hidden"] = hidden / self._step_tokens
        return out

    # --- the comparison -----------------------------------------------------------------------
    def _measure(self, model) -> dict:
        """Parameters, validation loss and forward speed (validation tokens per second) of one model."""
        out = {"total_params": count_params(model)[1]}
        if self.data.val:
            t0 = time.perf_counter()
            metrics = evaluate_loss(
                model, self.data.val, self.pad_id, self.cfg.train.batch_size, self.device, self.autocast()
            )
            seconds = time.perf_counter() - t0
            tokens = sum(len(e["input_ids"]) for e in self.data.val)
            out |= {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, int | float)}
            out |= {"eval_forward_s": seconds, "eval_forward_tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
        return out

    def finish(self, trainable: int, total: int, last_eval: dict, stop_reason: str | None = None):
        result = super().finish(trainable, total, last_eval, stop_reason)
        if not self.dist.is_main:
            return result
        teacher = self.teacher if self.teacher is not None else load_teacher(self.cfg, self.device)
        name = self.options.teacher
        report = {
            "teacher": {"name": name, **self._measure(teacher)},
            "student": {"name": self.cfg.model, **self._measure(self.model)},
            "temperature": self.options.temperature,
            "alpha": self.options.alpha,
            "hidden_weight": self.options.hidden_weight,
            "keep_every": self.options.keep_every,
            "cached": self.options.cache,
        }
        report["params_ratio"] = report["student"]["total_params"] / report["teacher"]["total_params"]
        summary = result.summary | {
            "parent": name if not Path(name).is_dir() else str(Path(name).resolve()),
            "distill": report,
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        self._log_report(report)
        result.summary = summary
        return result

    def _log_report(self, report: dict) -> None:
        from ..log import log

        for role in ("teacher", "student"):
            r = report[role]
            line = f"{role}: {r['total_params']:,} params"
            if "eval_loss" in r:
                line += f", eval loss {r['eval_loss']:.4f}, {r['eval_forward_tokens_per_s']:.0f} tokens/s forward"
            log(f"{line} ({r['name']})")
