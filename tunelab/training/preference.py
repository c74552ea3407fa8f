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

from ..attention import varlen_attention
from ..data.collate import pack_rows, packed_batch, pad_batch, varlen_batch
from ..data.preference import ANSWERS, pair_length
from ..errors import UserError
from ..io import atomic_write_bytes, read_safetensors
from ..log import log
from ..preference import METRICS, REFERENCE_OBJECTIVES, pair_terms, sequence_logps, step_loss_sum
from .loop import Trainer

REFERENCE_FILE = "reference_logps.safetensors"


def pair_batches(
    pairs: list[dict], batch_size: int, pad_id: int, packing: bool = False, capacity: int = 512, layout=None
) -> list[dict]:
    """Micro-batches of `batch_size` pairs (packed: rows), each holding its pairs' sequences in the order
    chosen, rejected, chosen, ... with `seq_ids` (every token's sequence, -1 for padding), `n_seqs` and, where
    the pairs carry them, precomputed `ref_logps`. Packed, a pair's two sequences share a row (rows of up to
    2 x capacity tokens: a pair is two examples of up to `capacity`)."""
    if packing:
        rows = pack_rows([pair_length(p) for p in pairs], 2 * capacity)
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        order = sorted(range(len(pairs)), key=lambda i: -pair_length(pairs[i]))
        groups = [[[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    batches = []
    for group in groups:
        members = [i for row in group for i in row]
        seqs = [pairs[i][key] for i in members for key in ANSWERS]
        lengths = [len(s["input_ids"]) for s in seqs]
        if not packing:
            batch = pad_batch(seqs, pad_id)
            seq_ids = torch.arange(len(seqs))[:, None].expand_as(batch["labels"]).clone()
        elif layout in ("varlen", "flash"):
            batch = varlen_batch(seqs)
            seq_ids = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths))[None]
        else:
            seq_rows, start = [], 0
            for row in group:
                seq_rows.append(list(range(start, start + 2 * len(row))))
                start += 2 * len(row)
            batch = packed_batch(seqs, seq_rows, pad_id, layout)
            seq_ids = torch.full_like(batch["labels"], -1)
            for r, row in enumerate(seq_rows):
                at = 0
                for s in row:
                    seq_ids[r, at : at + lengths[s]] = s
                    at += lengths[s]
        batch["seq_ids"] = seq_ids
        batch["n_seqs"] = len(seqs)
        if "ref_logps" in pairs[members[0]]:
            batch["ref_logps"] = torch.tensor([v for i in members for v in pairs[i]["ref_logps"]])
        batches.append(batch)
    return batches


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
        self.reference = None  # a separate frozen model; None: the adapter switched off, or precomputed / ORPO
        self._sums: dict[str, float] = {}
        if self.objective not in REFERENCE_OBJECTIVES:
            return
        if cfg.train.precompute_ref:
            self._precomputed_reference(resume_dir is not None)
        elif adapter_starts_as_identity(self.model, cfg, self.method):
            log("reference model: the base with the adapter switched off")
        else:
            # the base as loaded is the initial policy (full/freeze before training, PiSSA's base + adapter)
            self.reference = self.method.load_base(cfg, self.device).eval().requires_grad_(False)
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

    def _reference_logps(self, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if self.reference is None:
                with self.model.disable_adapter():
                    return sequence_logps(self.model, batch)[0]
            with varlen_attention(self.reference, "cu_seq_lens_q" in batch):
                return sequence_logps(self.reference, batch)[0]

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

    def pair_terms_of(self, batch: dict):
        logps, tokens = sequence_logps(self.model, batch)
        ref = self._reference_logps(batch) if self.objective in REFERENCE_OBJECTIVES else None
        return pair_terms(self.objective, self.options, logps, tokens, ref)

    def batch_loss(self, batch: dict) -> torch.Tensor:
        terms = self.pair_terms_of(batch)
        for key, value in terms.metric_sums().items():
            self._sums[key] += value
        return step_loss_sum(terms, self._step_pairs, self._step_chosen_tokens)

    def step_metrics(self) -> dict:
        values = self.dist.sum(*(self._sums[k] for k in METRICS))
        return {k: v / self._step_pairs for k, v in zip(METRICS, values)}

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval_loss (the objective over every validation pair) and the reward metrics as eval_*."""
        if not self.data.val:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums = dict.fromkeys(METRICS, 0.0)
        pair_loss = nll = 0.0
        chosen_tokens = 0
        for batch in pair_batches(self.data.val, self.cfg.train.batch_size, self.pad_id):
            with self.autocast():
                terms = self.pair_terms_of(self._to_device(batch))
            pair_loss += float(terms.pair_losses.sum())
            nll += float(terms.nll_sum) if terms.nll_sum is not None else 0.0
            chosen_tokens += terms.chosen_tokens
            for key, value in terms.metric_sums().items():
                sums[key] += value
        self.model.train(was_training)
        n = len(self.data.val)
        loss = pair_loss / n + (nll / chosen_tokens if self.objective == "orpo" else 0.0)
        return {"eval_loss": loss, **{f"eval_{k}": v / n for k, v in sums.items()}, "eval_pairs": n}
