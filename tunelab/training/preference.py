"""The training loop for task: preference (DPO, IPO, ORPO): the same recipe, with answer pairs as examples.

What changes against plain fine-tuning is only what the loop's hooks define: a step's loss is the mean
over its pairs (ORPO adds the NLL per chosen-answer token of the whole step), so accumulation and
processes still equal one big batch; a micro-batch holds both sequences of each of its pairs (packed
into one row where packing applies); reward metrics go to metrics.jsonl with the loss.

The reference model of DPO/IPO: the base with the adapter switched off for adapter methods whose adapter
starts as the identity (no second copy of the weights); else a frozen copy of the base; or, with
train.precompute_ref, every pair's reference log-probs computed once by the initial model and cached in
the run (reference_logps.safetensors), so a resumed run reads them back.
"""

from __future__ import annotations

import torch

from ..data.preference import pair_batches, pair_length
from ..errors import UserError
from ..io import atomic_write_bytes, read_safetensors
from ..log import log
from ..preference import (
    METRICS,
    REFERENCE_OBJECTIVES,
    Reference,
    batch_terms,
    evaluate_pairs,
    sequence_logps,
    step_loss_sum,
)
from .loop import Trainer

REFERENCE_FILE = "reference_logps.safetensors"


def adapter_starts_as_identity(model, cfg, method) -> bool:
    """An adapter whose initial state leaves the base unchanged: switched off, the model is the reference.
    PiSSA/OLoRA move the base's principal part into the adapter (their base alone is not the model)."""
    if not hasattr(model, "disable_adapter"):
        return False
    options = method.options(cfg) if getattr(cfg, "lora", None) is not None and hasattr(method, "options") else None
    return getattr(options, "init", "default") not in ("pissa", "olora")


class PreferenceTrainer(Trainer):
    """Trainer whose examples are encoded answer pairs (tunelab.data.preference)."""

    def __init__(self, cfg, resume_dir=None, **kwargs):
        super().__init__(cfg, resume_dir=resume_dir, **kwargs)
        cfg = self.cfg
        self.objective = cfg.train.objective
        self.options = cfg.preference
        self.reference = None  # ORPO has none
        self._sums: dict[str, float] = {}
        if self.objective not in REFERENCE_OBJECTIVES:
            return
        if cfg.train.precompute_ref:
            self._precomputed_reference(resume_dir is not None)  # the pairs carry them: any Reference reads them
            self.reference = Reference(self.model)
        elif adapter_starts_as_identity(self.model, cfg, self.method):
            log("reference model: the base with the adapter switched off")
            self.reference = Reference(self.model)
        else:
            # the base as loaded is the initial policy (full/freeze before training, PiSSA's base + adapter)
            frozen = self.method.load_base(cfg, self.device).eval().requires_grad_(False)
            self.reference = Reference(self.model, frozen)
            log("reference model: a frozen copy of the base (train.precompute_ref: true avoids it)")

    # --- the reference ------------------------------------------------------------------------
    def _precomputed_reference(self, resumed: bool) -> None:
        path = self.run_dir / REFERENCE_FILE
        splits = {"train": self.data.train, "val": self.data.val}
        if resumed:
            if not path.exists():
                raise UserError(f"{path}: missing: the reference log-probs cannot be recomputed after training")
            saved = read_safetensors(path)
            for name, pairs in splits.items():
                if name not in saved or saved[name].shape != (len(pairs), 2):
                    raise UserError(f"{path}: does not match the run's {len(pairs)} {name} pairs")
        else:
            log(f"reference log-probs: {len(self.data.train) + len(self.data.val)} pairs, once, by the initial model")
            saved = {name: self._sequence_logps_of(pairs) for name, pairs in splits.items()}
            if self.dist.is_main:
                from safetensors.torch import save

                atomic_write_bytes(path, save({k: v.contiguous() for k, v in saved.items()}))
        for name, pairs in splits.items():
            for pair, values in zip(pairs, saved[name].tolist()):
                pair["ref_logps"] = tuple(values)

    @torch.no_grad()
    def _sequence_logps_of(self, pairs: list[dict]) -> torch.Tensor:
        """(pairs, 2) summed log-probs of the chosen and rejected answers under the model as it is now."""
        was_training = self.model.training
        self.model.eval()
        out = torch.zeros(len(pairs), 2, dtype=torch.float32)
        order = sorted(range(len(pairs)), key=lambda i: -pair_length(pairs[i]))  # the batches' order
        at = 0
        for batch in pair_batches(pairs, self.cfg.train.batch_size, self.pad_id):
            batch = self._to_device(batch)
            with self.autocast():
                logps, _ = sequence_logps(self.model, batch)
            k = batch["n_seqs"] // 2
            out[order[at : at + k]] = logps.float().cpu().view(k, 2)
            at += k
        self.model.train(was_training)
        return out

    # --- the loop's hooks ---------------------------------------------------------------------
    def example_lengths(self, examples: list[dict]) -> list[int]:
        return [pair_length(p) for p in examples]

    def loss_normaliser(self, step_examples: list[dict]) -> int:
        """The step's pair count; ORPO's NLL term is scaled by pairs / chosen tokens of the step, so the step
        loss is (mean pair term) + (NLL per chosen token), however the step is split."""
        self._step_pairs = len(step_examples)
        self._step_chosen_tokens = sum(sum(1 for x in p["chosen"]["labels"][1:] if x != -100) for p in step_examples)
        self._sums = dict.fromkeys(METRICS, 0.0)  # a step redone after out-of-memory starts again
        return self._step_pairs

    def micro_batches(self, examples: list[dict]) -> list[dict]:
        t = self.cfg.train
        return pair_batches(examples, self.micro_batch, self.pad_id, t.packing, self.cfg.data.max_length, self.layout)

    def batch_loss(self, batch: dict) -> torch.Tensor:
        terms = batch_terms(self.model, batch, self.objective, self.options, self.reference)
        for key, value in terms.metric_sums().items():
            self._sums[key] += value
        return step_loss_sum(terms, self._step_pairs, self._step_chosen_tokens)

    def step_metrics(self) -> dict:
        values = self.dist.sum(*(self._sums[k] for k in METRICS))
        return {k: v / self._step_pairs for k, v in zip(METRICS, values)}

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def evaluate(self) -> dict:
        """eval_loss (the objective over every validation pair) and the reward metrics as eval_*."""
        return evaluate_pairs(
            self.model,
            self.data.val,
            self.objective,
            self.options,
            self.reference,
            self.cfg.train.batch_size,
            self.pad_id,
            self.device,
            self.autocast(),
        )


def eval_reference(model, cfg, run_dir, pairs: list[dict], own_split: bool) -> Reference | None:
    """The reference for `tunelab eval` of a trained preference model: the run's cached log-probs (its own
    validation split), the adapter switched off, or a fresh copy of the base."""
    from ..methods import get_method
    from ..models import load_causal_lm

    if cfg.train.objective not in (*REFERENCE_OBJECTIVES, None):
        return None
    path = run_dir / REFERENCE_FILE if run_dir is not None else None
    if own_split and cfg.train.precompute_ref and path is not None and path.exists():
        cached = read_safetensors(path)["val"]
        if cached.shape == (len(pairs), 2):
            for pair, values in zip(pairs, cached.tolist()):
                pair["ref_logps"] = tuple(values)
            return Reference(model)
    if adapter_starts_as_identity(model, cfg, get_method(cfg.method)):
        return Reference(model)
    device = next(model.parameters()).device
    base = load_causal_lm(cfg.model, device, torch.float32, cfg.trust_remote_code, cfg.allow_pickle)
    return Reference(model, base.eval().requires_grad_(False))
