"""tunelab: fine-tune language models efficiently, with every common method behind one switch.

Library API mirroring the CLI:
    result = tunelab.train("config.yaml", ["train.max_steps=50"])
    model, tokenizer = tunelab.load(result.run_dir)
    print(tunelab.generate(model, tokenizer, "Hello"))
"""

import os

# Nothing downloads at run time: models come from packages or local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"

from .quant import quiet_bitsandbytes_logs  # noqa: E402 - before anything imports bitsandbytes

quiet_bitsandbytes_logs()


def train(config=None, overrides=None, resume=None, progress=True):
    """Train from a YAML path, dict or Config; returns TrainResult(run_dir, summary)."""
    from .training import train as _train

    return _train(config, overrides, resume=resume, progress=progress)


def load(run_or_model, device=None, adapters=None, trust_remote_code=False, allow_pickle=False):
    """Load a run directory (base + trained artifact) or a bare model name; returns (model, tokenizer).
    `adapters={"task": RUN}` adds more adapters on the same base (switch with model.set_adapter).
    `trust_remote_code` / `allow_pickle` opt in to a bare model's own code / pickle weights."""
    from .loading import load as _load

    return _load(
        run_or_model, device=device, adapters=adapters, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )


def generate(model, tokenizer, prompt, **settings):
    """One chat completion for `prompt` with the run's chat template; see tunelab.generate.GenerationSettings."""
    from .generation import GenerationSettings, generate_text

    return generate_text(model, tokenizer, prompt, GenerationSettings(**settings))


__all__ = ["__version__", "generate", "load", "train"]
