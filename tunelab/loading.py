"""Loading a run directory (base model + trained artifact) or a bare model for inference."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import load_config
from .data.encode import resolve_chat_template
from .device import pick_device
from .errors import UserError
from .methods import get_method
from .models import load_causal_lm, load_tokenizer


def is_run_dir(path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "summary.json").is_file()


def load(run_or_model, device=None):
    """(model, tokenizer), in eval mode, with the run's chat template set on the tokenizer.

    The run's config is attached as `model.tunelab_config` (generation reads its system prompt).
    """
    device = device or pick_device()
    path = Path(str(run_or_model))
    if path.is_dir() and (path / "config.yaml").is_file():
        if not is_run_dir(path):
            raise UserError(f"{path}: the run has no summary.json (unfinished?); resume it with tunelab train --resume {path}")
        cfg = load_config(path / "config.yaml")
        method = get_method(cfg.method)
        artifact = path / method.artifact
        if not artifact.is_dir():
            raise UserError(f"{path}: missing {method.artifact}/ (the trained {method.artifact})")
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        base = load_causal_lm(cfg.model, device, torch.float32, cfg.trust_remote_code)
        try:
            model = method.load(base, artifact, cfg)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{artifact}: cannot load the trained {method.artifact}: {exc}") from None
        tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.data.chat_template)
        model.tunelab_config = cfg
    else:
        tokenizer = load_tokenizer(str(run_or_model))
        model = load_causal_lm(str(run_or_model), device)
        tokenizer.chat_template = resolve_chat_template(tokenizer, "auto")
        model.tunelab_config = None
    model.to(device)
    model.eval()
    return model, tokenizer
