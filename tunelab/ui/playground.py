"""The playground: chat with a run, loaded as `tunelab generate`/`chat` load it and decoded with the same
`GenerationSettings`, so a greedy answer here is the one `tunelab generate RUN --temperature 0` prints."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import UserError
from ..generation import GenerationSettings, generate_batch

KEEP_LOADED = 2  # two runs side by side stay in memory; a third replaces the least recently used


class Playground:
    def __init__(self, keep: int = KEEP_LOADED):
        self.keep = keep
        self._models: OrderedDict[Path, tuple] = OrderedDict()
        self._lock = threading.Lock()  # one generation at a time (the CPU is shared anyway)

    def _model(self, run: Path):
        from ..loading import load

        if run in self._models:
            self._models.move_to_end(run)
            return self._models[run]
        loaded = load(run)
        self._models[run] = loaded
        while len(self._models) > self.keep:
            self._models.popitem(last=False)
        return loaded

    def reply(self, run: Path, messages: list[dict], settings: GenerationSettings, system: str | None = None) -> str:
        """The assistant's next message after `messages` ([{role, content}], the last one the user's)."""
        settings.validate()
        if not messages or messages[-1].get("role") != "user":
            raise UserError("the conversation must end with a user message")
        with self._lock:
            model, tokenizer = self._model(run)
            if getattr(model.tunelab_config, "task", "causal_lm") != "causal_lm":
                raise UserError(f"{run.name}: a {model.tunelab_config.task} run does not generate text")
            return generate_batch(model, tokenizer, [messages], settings, system=system)[0]
