"""What tunelab agrees to read from a model or adapter folder, in one place.

- Weights: safetensors only. Unpickling a `pytorch_model.bin`, `*.pt`, `*.pth` or `*.ckpt` can run
  arbitrary code, so a folder that has only pickle weights is refused unless the config opts in with
  `allow_pickle: true` (then a warning line is printed).
- Code: a model whose `config.json` maps the auto classes to its own Python files (`auto_map`) and
  whose architecture transformers does not know needs `trust_remote_code: true` (then a warning line
  is printed). Where transformers has the architecture built in, its own code is used and nothing from
  the folder runs.

A damaged safetensors file is caught by `tunelab.io.check_safetensors` / `read_safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .io import check_safetensors, read_json_object
from .log import warn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# pickle files a training framework leaves next to the weights; not weights, never read
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the PEFT layout's weights file


def pickle_weight_files(folder: Path) -> list[str]:
    """Names of the pickle weight files directly in `folder`, sorted."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and p.name.endswith(PICKLE_SUFFIXES) and p.name not in _NOT_WEIGHTS
    )


def _refuse_or_warn_pickle(folder: Path, files: list[str], allow_pickle: bool) -> None:
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    if not allow_pickle:
        raise UserError(
            f"{folder}: has only pickle weights ({shown}), and tunelab reads safetensors only because "
            "unpickling can run arbitrary code; convert them to safetensors, or set `allow_pickle: true` "
            "in the config if you trust where they came from"
        )
    warn(
        f"{folder}: reading pickle weights ({shown}) because allow_pickle is true; "
        "unpickling can run code, so only do this for files you trust"
    )


def model_weights_are_safetensors(folder, allow_pickle: bool) -> bool | None:
    """transformers' `use_safetensors` for a model: True to read safetensors (the rule), False to read
    a local folder's pickle weights (only with `allow_pickle`, warned). A folder with only pickle
    weights and no opt-in is a UserError naming the file and the opt-in; one with neither is left to
    the loader's own message. A cached hub id cannot be looked into here: None (safetensors first,
    else pickle) when pickle is allowed."""
    folder = Path(folder)
    if not folder.is_dir():
        return None if allow_pickle else True
    if any(folder.glob("*.safetensors")):
        return True
    files = pickle_weight_files(folder)
    if not files:
        return True
    _refuse_or_warn_pickle(folder, files, allow_pickle)
    return False


def check_adapter_folder(folder, allow_pickle: bool) -> None:
    """Before PEFT loads an adapter: its safetensors weights must be whole. peft would fall back to
    `adapter_model.bin` (a pickle) when they are missing, so that needs the `allow_pickle` opt-in."""
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists() and folder.is_dir():
        files = pickle_weight_files(folder)
        if files:
            _refuse_or_warn_pickle(folder, files, allow_pickle)
            return
    check_safetensors(weights, missing="missing (the adapter weights)")
    read_json_object(folder / "adapter_config.json", missing="missing (the adapter config)")


def _code_files(auto_map: dict) -> list[str]:
    """The Python files an `auto_map` points at ("module.Class" or "repo--module.Class")."""
    refs = []
    for value in auto_map.values():
        refs.extend(value if isinstance(value, (list, tuple)) else [value])
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs if isinstance(r, str) and "." in r})


def _read_model_config(folder: Path) -> dict | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the loader reports an unreadable config itself
    return config if isinstance(config, dict) else None


def check_remote_code(folder, name: str, trust_remote_code: bool) -> None:
    """Refuse a local model that needs its own Python code unless `trust_remote_code`; warn when it runs."""
    folder = Path(folder)
    config = _read_model_config(folder) if folder.is_dir() else None
    auto_map = (config or {}).get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        return
    files = ", ".join(_code_files(auto_map)) or "auto_map"
    if trust_remote_code:
        warn(f"model '{name}' runs its own Python code ({files}) because trust_remote_code is true")
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return  # transformers' built-in architecture is used; the folder's code does not run
    raise UserError(needs_custom_code_message(name, f"{folder / 'config.json'} auto_map: {files}"))


def needs_custom_code_message(name: str, detail: str) -> str:
    return (
        f"model '{name}' needs its own Python code to load ({detail}); set `trust_remote_code: true` "
        "in the config only if you trust its source"
    )
