"""`tunelab methods`: every method with its config block, defaults and (for a model) parameter accounting."""

from __future__ import annotations

from ..config import build_config
from . import METHODS


def section_defaults(method) -> dict:
    """Each config section the method reads, with its defaults."""
    return {name: cls().model_dump(mode="json") for name, cls in method.sections.items()}


def count_for_model(name: str, model: str, task: str = "causal_lm") -> dict:
    """Apply a method to the model (no training) and count parameters; artifact bytes as fp32 tensors."""
    from ..device import pick_device
    from ..training.accounting import count_params

    overrides = {"model": model, "method": name, "task": task}
    if task == "classification":
        overrides["data"] = {"labels": ["a", "b"]}
    cfg = build_config(overrides)
    method = METHODS[name]
    trained = method.apply(method.load_base(cfg, pick_device()), cfg, total_steps=100)
    trainable, total = count_params(trained)
    stored = total if method.artifact == "model" else trainable
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "artifact_bytes_est": 4 * stored,
    }


def method_table(model: str | None = None, task: str = "causal_lm") -> list[dict]:
    rows = []
    for name, method in METHODS.items():
        row = {
            "method": name,
            "artifact": f"{method.artifact}/",
            "default_lr": method.default_lr,
            "config_sections": list(method.sections),
            "defaults": section_defaults(method),
            "summary": method.summary,
        }
        if model:
            row.update(count_for_model(name, model, task))
        rows.append(row)
    return rows
