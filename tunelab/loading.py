"""Loading a run directory (base model + trained artifact) or a bare model for inference."""

from __future__ import annotations

import pickle
from pathlib import Path

from .config import load_config
from .data.encode import resolve_chat_template
from .device import pick_device
from .errors import UserError
from .methods import get_method
from .models import load_causal_lm, load_tokenizer
from .trust import check_adapter_folder

# what peft raises on a damaged or foreign artifact folder: it reads its config fields without checking them
# (a `trainable_token_indices` out of the vocabulary is an IndexError; a `megatron_config` imports Megatron)
ARTIFACT_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    TypeError,
    LookupError,
    AttributeError,
    ImportError,
    pickle.UnpicklingError,
)


def is_run_dir(path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "summary.json").is_file()


def _load_run(path: Path, device):
    cfg = load_config(path / "config.yaml", saved_run=True)
    method = get_method(cfg.method)
    artifact = path / method.artifact
    if not artifact.is_dir():
        raise UserError(f"{path}: missing {method.artifact}/ (the trained {method.artifact})")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    base = method.load_base(cfg, device) if method.needs_base else None
    try:
        model = method.load(base, artifact, cfg)
    except ARTIFACT_ERRORS as exc:
        raise UserError(
            f"{artifact}: cannot load the trained {method.artifact}: {' '.join(str(exc).split())[:300]}"
        ) from None
    tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.data.chat_template)
    model.tunelab_config = cfg
    return model, tokenizer, cfg


def load(
    run_or_model, device=None, adapters: dict | None = None, trust_remote_code: bool = False, allow_pickle: bool = False
):
    """(model, tokenizer), in eval mode, with the run's chat template set on the tokenizer.

    `adapters={"task": RUN, ...}` loads more PEFT adapters onto the same base (stored once); switch
    with `model.set_adapter("task")`, and `with model.disable_adapter():` gives the base back. The
    first run's adapter is named by its config's `adapter_name`. The run's config is attached as
    `model.tunelab_config` (generation reads its system prompt). `trust_remote_code` and
    `allow_pickle` are the opt-ins for a bare model; a run uses its config's.
    """
    device = device or pick_device()
    path = Path(str(run_or_model))
    if path.is_dir() and (path / "config.yaml").is_file():
        if not is_run_dir(path):
            raise UserError(
                f"{path}: the run has no summary.json (unfinished?); resume it with tunelab train --resume {path}"
            )
        model, tokenizer, cfg = _load_run(path, device)
        for name, run in (adapters or {}).items():
            _add_adapter(model, cfg, name, Path(run))
    else:
        if adapters:
            raise UserError("adapters= needs a run directory as the first argument")
        tokenizer = load_tokenizer(str(run_or_model), trust_remote_code)
        model = load_causal_lm(
            str(run_or_model), device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        tokenizer.chat_template = resolve_chat_template(tokenizer, "auto")
        model.tunelab_config = None
    model.eval()
    return model, tokenizer


def merged_for_inference(model):
    """`model` with LoRA-style adapters (LoRA, DoRA, rsLoRA, PiSSA, IA3, AdaLoRA) folded into its weights, in
    place: one plain matmul per layer, and DoRA's weight norms are no longer recomputed in every forward. For a
    model that trains no more and whose outputs need not match the adapter's bit for bit (a distillation
    teacher): the logits agree to ~1e-6, but near-ties in greedy decoding can flip. Others (prompt learning,
    bottleneck adapters, a 4-bit base, whose merge would round) come back as they are."""
    if not hasattr(model, "merge_and_unload") or getattr(model, "is_loaded_in_4bit", False):
        return model
    try:
        return model.merge_and_unload()
    except (AttributeError, ValueError, TypeError):  # prompt-learning adapters cannot merge
        return model


def _add_adapter(model, cfg, name: str, run: Path) -> None:
    if not hasattr(model, "load_adapter") or not hasattr(model, "peft_config"):
        raise UserError(f"method '{cfg.method}' does not produce PEFT adapters; several adapters need a PEFT method")
    other = load_config(run / "config.yaml", saved_run=True)
    if other.model != cfg.model:
        raise UserError(f"{run}: trained on '{other.model}', not on the shared base '{cfg.model}'")
    if name in model.peft_config:
        return  # already loaded (the first run's adapter is named by its config's adapter_name)
    artifact = run / get_method(other.method).artifact
    check_adapter_folder(artifact, other.allow_pickle)  # peft itself would fall back to a pickle file
    model.load_adapter(str(artifact), adapter_name=name)
