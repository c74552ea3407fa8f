"""What every tuning method provides: load the base, make it trainable, save its artifact, load it back."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, did_you_mean
from ..models import load_causal_lm, load_classifier, load_tokenizer
from ..trust import check_adapter_folder


class Method:
    name: str = ""
    artifact: str = "adapter"  # "adapter" (small, needs the base) or "model" (a full model directory)
    summary: str = ""
    default_lr: float = 2e-4
    # the config sections the method reads: name -> pydantic Section class (a section it does not list is
    # an error in its config)
    sections: dict = {}
    virtual_tokens = False  # prepends virtual tokens to every row (so packing several examples is not exact)
    # whole weights train, so each step frees their gradients and allocates them again: on a CPU the trainer has
    # glibc keep that memory for the next step (device.keep_freed_memory; measured faster there, and it
    # fragmented the heap of a prefix-tuning step by half its peak)
    frees_weight_gradients = False

    def load_base(self, cfg, device):
        """The base model this method trains on (fp32 master weights unless the method quantizes)."""
        if cfg.task == "classification":
            return load_classification_base(cfg, device)
        return load_causal_lm(cfg.model, device, torch.float32, cfg.trust_remote_code, cfg.allow_pickle)

    def frozen_at_compute_dtype(self, cfg) -> bool:
        """Whether the frozen base's linear weights may be stored at the autocast dtype (bf16/fp16) for
        training: true where the method's forward only feeds them to matmuls (autocast rounds them so anyway)."""
        return False

    needs_base = True  # False: the artifact is a whole model and loads without the base

    def apply(self, model, cfg, total_steps: int = 1000):
        """Make the model trainable for this method; returns the model to train."""
        raise NotImplementedError

    def save(self, model, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, base_model, artifact_dir: Path, cfg):
        """Rebuild the trained model from the base and the saved artifact (for inference)."""
        raise NotImplementedError

    def lr_multiplier(self, param_name: str, cfg) -> float:
        """Per-parameter LR multiplier the method asks for (LoRA+ raises B's); 1.0 by default."""
        return 1.0

    def extra_loss(self, model):
        """A regulariser added to the mean token loss (AdaLoRA's orthogonality); None by default."""
        return None

    def on_step_end(self, model, step: int) -> None:
        """Called after each optimizer step, before gradients are cleared (AdaLoRA's budget schedule)."""


def load_classification_base(cfg, device, **kwargs):
    if not cfg.data.labels:
        raise ValueError("classification needs cfg.data.labels (filled from the training data)")
    pad = load_tokenizer(cfg.model, cfg.trust_remote_code).pad_token_id
    return load_classifier(
        cfg.model,
        cfg.data.labels,
        device,
        torch.float32,
        cfg.trust_remote_code,
        pad,
        allow_pickle=cfg.allow_pickle,
        **kwargs,
    )


def classification_head(model):
    """The classification head module of a sequence-classification model (None for LMs)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    return None


def peft_task_type(cfg) -> str:
    return "SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM"


def _linear_names(model) -> list[str]:
    """The distinct last name segments of the model's linear layers (what target lists name)."""
    from torch import nn

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, nn.Linear)})


def check_module_names(model, options: dict) -> None:
    """Every module name (or regex string) the user gave must match a module, as peft matches them: a
    list entry matches a module named so or ending in `.name`; a string other than `all-linear` is a
    full-match regex. peft alone accepts a list where some entries match nothing."""
    import re

    names = [n for n, _ in model.named_modules() if n]
    linear = _linear_names(model)
    for key, value in options.items():
        if value is None or value == "all-linear":
            continue
        if isinstance(value, str):
            try:
                hit = any(re.fullmatch(value, n) for n in names)
            except re.error as exc:
                raise ConfigError(f"{key}: {value!r} is not a valid regular expression ({exc})") from None
            if not hit:
                raise ConfigError(
                    f"{key}: the pattern {value!r} matches no module name of the model (a string is a "
                    f"regex over full names; give a list of names instead, e.g. {linear[:4]})"
                )
            continue
        for target in value:
            if not any(n == target or n.endswith(f".{target}") for n in names):
                hint = did_you_mean(target, linear)
                raise ConfigError(
                    f"{key}: '{target}' matches no module of the model{hint}; its linear layers: {', '.join(linear)}"
                )


class PeftMethod(Method):
    """A method backed by a peft config: saved and loaded in the plain PEFT layout."""

    def peft_config(self, cfg, model, total_steps: int = 1000):
        raise NotImplementedError

    def module_options(self, cfg) -> dict:
        """Config key -> the module names the user gave there (checked against the model before peft)."""
        return {}

    def apply(self, model, cfg, total_steps: int = 1000):
        from peft import get_peft_model

        check_module_names(model, self.module_options(cfg))
        config = self.peft_config(cfg, model, total_steps)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:  # e.g. no default target modules for an architecture peft does not know
            raise ConfigError(f"method '{cfg.method}': {' '.join(str(exc).split())[:400]}") from None

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base_model, artifact_dir: Path, cfg):
        from peft import PeftModel

        check_adapter_folder(artifact_dir, cfg.allow_pickle)  # peft itself would fall back to a pickle file
        return PeftModel.from_pretrained(base_model, artifact_dir, adapter_name=cfg.adapter_name, is_trainable=False)
