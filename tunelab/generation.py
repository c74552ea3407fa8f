"""Text generation with the run's chat template: one prompt, a batch of prompts, or a terminal chat.

`GenerationSettings` is the one home of the decoding defaults: `tunelab generate`, `tunelab chat`, the
Python API, evaluation and the demo all build theirs from it. Temperature 0 is plain greedy decoding
(no repetition penalty unless one is asked for), which is what evaluation scores.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError

SAMPLING_REPETITION_PENALTY = 1.1  # the default when sampling; greedy decoding has none


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means plain greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float | None = None  # None: 1.1 when sampling, none (1.0) when greedy
    seed: int | None = None

    @classmethod
    def greedy(cls, max_new_tokens: int) -> GenerationSettings:
        """What evaluation and the demo decode with."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0)

    @property
    def penalty(self) -> float:
        if self.repetition_penalty is not None:
            return self.repetition_penalty
        return 1.0 if self.temperature == 0 else SAMPLING_REPETITION_PENALTY

    def validate(self) -> GenerationSettings:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value}")
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("top_k must be >= 0")
        if self.penalty <= 0:
            raise UserError("repetition_penalty must be > 0")
        return self

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if self.penalty != 1.0:
            kwargs["repetition_penalty"] = self.penalty
        if self.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def _system_prompt(model, system: str | None) -> str | None:
    if system is not None:
        return system
    cfg = getattr(model, "tunelab_config", None)
    return cfg.data.system_prompt if cfg is not None else None


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def without_cut_character(text: str) -> str:
    """A finished answer without the U+FFFD its last token may leave: byte-level BPE spells a Chinese character
    with up to three tokens, and a token limit can stop between them."""
    return text.rstrip("\ufffd")


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream_end:
                text = without_cut_character(text)
            if text:
                on_text(text)

    return Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_batch(
    model,
    tokenizer,
    prompts: list,
    settings: GenerationSettings,
    batch_size: int = 16,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> list[str]:
    """Completions for many prompts (strings or message lists), left-padded in batches. `system`
    replaces the run's system prompt; `on_text` receives the text as it is generated (one prompt only)."""
    # imported here, not at the top: the command line's parser reads this module's defaults without torch
    # (transformers' generate runs without gradients by itself)
    import torch

    from .data.encode import prompt_text
    from .methods.lora import dora_norms_cached

    settings.validate()
    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming (on_text) takes one prompt")
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    texts = [
        prompt_text(tokenizer, tokenizer.chat_template, _messages(p), _system_prompt(model, system)) for p in prompts
    ]
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        with dora_norms_cached(model):  # DoRA: each layer's merged weight norm once, not per decoding step
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                )
                enc = {k: v.to(device) for k, v in enc.items()}
                streamer = _streamer(tokenizer, on_text) if on_text is not None else None
                out = model.generate(**enc, **settings.generate_kwargs(tokenizer), streamer=streamer)
                new = out[:, enc["input_ids"].shape[1] :]
                outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return [without_cut_character(o).strip() for o in outputs]


def generate_text(
    model,
    tokenizer,
    prompt,
    settings: GenerationSettings | None = None,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    return generate_batch(model, tokenizer, [prompt], settings or GenerationSettings(), system=system, on_text=on_text)[
        0
    ]


CHAT_HELP = "commands: /reset clears the history, /help shows this, /exit (or Ctrl-D) quits"


def chat_loop(
    model, tokenizer, settings: GenerationSettings, stdin=None, stdout=None, system: str | None = None
) -> None:
    """Interactive chat, streamed: the conversation so far is kept; /reset clears it, /help, /exit or EOF ends."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []
    print(f"chat: type a message; {CHAT_HELP}", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # Ctrl-D or the end of piped input: leave the shell's prompt on a line of its own
            print(file=stdout, flush=True)
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            print("(history cleared)", file=stdout, flush=True)
            continue
        if line in ("/help", "/?"):
            print(CHAT_HELP, file=stdout, flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=stdout, flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", file=stdout, flush=True)
        reply = generate_batch(
            model,
            tokenizer,
            [history],
            settings,
            system=system,
            on_text=lambda text: print(text, end="", file=stdout, flush=True),
        )[0]
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": reply})


__all__ = ["GenerationSettings", "chat_loop", "generate_batch", "generate_text"]
