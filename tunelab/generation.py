"""Text generation with the run's chat template: one prompt, a batch of prompts, or a terminal chat."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .data.encode import prompt_text


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: Optional[int] = None

    def validate(self) -> "GenerationSettings":
        import math

        from .errors import UserError

        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise UserError("repetition_penalty must be > 0")
        return self

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if self.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def _system_prompt(model) -> Optional[str]:
    cfg = getattr(model, "tunelab_config", None)
    return cfg.data.system_prompt if cfg is not None else None


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list, settings: GenerationSettings, batch_size: int = 16) -> list[str]:
    """Completions for many prompts (strings or message lists), left-padded in batches."""
    settings.validate()
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    texts = [prompt_text(tokenizer, tokenizer.chat_template, _messages(p), _system_prompt(model)) for p in prompts]
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, **settings.generate_kwargs(tokenizer))
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return [o.strip() for o in outputs]


def generate_text(model, tokenizer, prompt, settings: Optional[GenerationSettings] = None) -> str:
    return generate_batch(model, tokenizer, [prompt], settings or GenerationSettings())[0]


def chat_loop(model, tokenizer, settings: GenerationSettings, stdin=None, stdout=None) -> None:
    """Interactive chat: the conversation so far is kept; /reset clears it, /exit or EOF ends."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []
    print("chat: type a message; /reset clears the history, /exit quits", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate_batch(model, tokenizer, [history], settings)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", file=stdout, flush=True)


__all__ = ["GenerationSettings", "chat_loop", "generate_batch", "generate_text"]
