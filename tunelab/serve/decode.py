"""Step-wise decoding of a batch of sequences, each with its own adapter, settings, stop strings and seed.

`model.generate` takes one set of settings for a whole batch; a server's batch mixes requests that differ
in `max_tokens`, `temperature`, `stop` and `seed`, and wants each new token as it comes (streaming). So the
loop is written out: the same forward calls as transformers' greedy/sampling loop (left padding, position
ids from the attention mask, a KV cache, logits of the last position only), and per row transformers'
own logits processors. Greedy rows are plain argmax, as in `tunelab generate`; a row stops on EOS, on
its `max_tokens`, on a stop string, or when cancelled, and leaves the batch (its cache rows are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..generation import GenerationSettings

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(eq=False)
class Sequence:
    """One completion being decoded. `adapter` is the peft adapter name (BASE for the base model)."""

    prompt_ids: list[int]
    settings: GenerationSettings
    adapter: str = BASE
    stop: tuple[str, ...] = ()
    max_positions: int | None = None  # the model's context length: a sequence stops there ("length")
    ignore_eos: bool = False  # vLLM's option: decode max_new_tokens whatever comes (load tests)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the decoded completion, cut before a stop string once one is found
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
    cancelled: bool = False  # set from another thread; the row leaves the batch at the next step
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.settings.temperature > 0:
            self.generator = torch.Generator()
            if self.settings.seed is not None:
                self.generator.manual_seed(self.settings.seed)
            else:
                self.generator.seed()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _processors(self):
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        # the order and conditions of transformers' generate (GenerationMixin._get_logits_processor)
        s, procs = self.settings, LogitsProcessorList()
        if s.penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(s.penalty))
        if s.temperature > 0:
            if s.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:
                procs.append(TopKLogitsWarper(top_k=s.top_k))
            if s.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=s.top_p))
        return procs

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token from this row's fp32 logits (shape [vocab])."""
        procs = self._processors()
        if procs:
            ids = torch.tensor([self.prompt_ids + self.generated])
            logits = procs(ids, logits.unsqueeze(0)).squeeze(0)
        if self.settings.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def add(self, token: int, tokenizer) -> None:
        """Record a generated token and decide whether the sequence is done."""
        self.generated.append(token)
        if token == tokenizer.eos_token_id and not self.ignore_eos:
            self.finish_reason = "stop"
        self.text = tokenizer.decode(self.generated, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
        if self.finish_reason is None and (
            len(self.generated) >= self.settings.max_new_tokens
            or (self.max_positions is not None and len(self.prompt_ids) + len(self.generated) >= self.max_positions)
        ):
            self.finish_reason = "length"


class BatchDecode:
    """Decode `seqs` together on `model`, one token per sequence per `step()`.

    `mixed`: pass each row's adapter to peft (`adapter_names`, LoRA only); otherwise the caller has set
    the model up for the whole batch (one adapter, or a model of its own)."""

    def __init__(self, model, tokenizer, seqs: list[Sequence], mixed: bool):
        self.model, self.tokenizer, self.mixed = model, tokenizer, mixed
        self.active = [s for s in seqs if not s.finished]
        self.cache = None
        width = max((len(s.prompt_ids) for s in self.active), default=0)
        pad = tokenizer.pad_token_id
        device = next(model.parameters()).device
        self.input_ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in self.active])
        self.attention_mask = torch.tensor(
            [[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in self.active]
        )
        self.input_ids, self.attention_mask = self.input_ids.to(device), self.attention_mask.to(device)
        # as transformers' generate: positions count real tokens only, padding sits at 0
        self.position_ids = (self.attention_mask.cumsum(-1) - 1).masked_fill(self.attention_mask == 0, 0)

    @property
    def done(self) -> bool:
        return not self.active

    def _adapter_kwargs(self) -> dict:
        if not self.mixed or not hasattr(self.model, "peft_config"):
            return {}
        names = [s.adapter for s in self.active]
        if not self.model.peft_config:  # every adapter unloaded: the LoRA layers are inert
            return {}
        return {"adapter_names": names}

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One forward pass: a token for every active sequence. Returns the sequences it advanced
        (finished ones included, for the last time)."""
        self._drop([s for s in self.active if s.cancelled], reason="cancelled")
        if not self.active:
            return []
        out = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **self._adapter_kwargs(),
        )
        self.cache = out.past_key_values
        logits = out.logits[:, -1, :].to(dtype=torch.float32)
        advanced = list(self.active)
        tokens = []
        for row, seq in enumerate(advanced):
            token = seq.next_token(logits[row])
            seq.add(token, self.tokenizer)
            tokens.append(token)
        device = self.input_ids.device
        self.input_ids = torch.tensor(tokens, device=device).unsqueeze(1)
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(tokens), 1))], dim=-1)
        self.position_ids = self.position_ids[:, -1:] + 1
        self._drop([s for s in self.active if s.finished])
        return advanced

    def _drop(self, gone: list[Sequence], reason: str | None = None) -> None:
        if not gone:
            return
        for seq in gone:
            if reason is not None and seq.finish_reason is None:
                seq.finish_reason = reason
        keep = [i for i, s in enumerate(self.active) if s not in gone]
        self.active = [self.active[i] for i in keep]
        if not keep:
            self.cache = None
            return
        index = torch.tensor(keep, device=self.input_ids.device)
        self.input_ids = self.input_ids[index]
        self.attention_mask = self.attention_mask[index]
        self.position_ids = self.position_ids[index]
        if self.cache is not None:
            self.cache.batch_select_indices(index)
