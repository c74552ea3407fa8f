"""`tunelab serve --check RUN`: is the run's adapter also ready for vLLM's `--lora-modules`?

vLLM serves plain LoRA only: no DoRA, no `modules_to_save`, a rank at most `--max-lora-rank` (16 unless
raised, to one of its allowed sizes), biases only with `--enable-lora-bias`, and the linear layers it
knows how to adapt.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..errors import UserError

VLLM_DEFAULT_MAX_RANK = 16
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}


def _adapter_folder(run: Path) -> tuple[Path, str | None, str]:
    """(peft adapter folder, the run's method or None, the base model) of a run or a bare adapter folder."""
    from ..config import load_config
    from ..io import read_json_object
    from ..loading import is_run_dir
    from ..methods import get_method

    if is_run_dir(run):
        cfg = load_config(run / "config.yaml")
        if get_method(cfg.method).artifact != "adapter":
            raise UserError(f"{run}: a '{cfg.method}' run saves a whole model; vLLM serves it as the model itself")
        return run / "adapter", cfg.method, cfg.model
    if (run / "adapter_config.json").is_file():
        base = read_json_object(run / "adapter_config.json").get("base_model_name_or_path") or "BASE_MODEL"
        return run, None, base
    raise UserError(f"{run}: neither a finished run folder nor a peft adapter folder")


def vllm_check(run) -> dict:
    """{'ready', 'problems', 'rank', 'target_modules', 'dora', 'command', ...} for the adapter of `run`."""
    from ..io import read_json_object
    from ..models import resolve_model_path
    from ..trust import check_adapter_folder
    from .adapters import lora_facts

    run = Path(run)
    folder, method, base = _adapter_folder(run)
    check_adapter_folder(folder, allow_pickle=False)
    config = read_json_object(folder / "adapter_config.json")
    facts = lora_facts(config)
    problems, notes, flags = [], [], []
    if facts["peft_type"] != "LORA":
        problems.append(f"a {facts['peft_type']} adapter ({method or 'peft'}): vLLM serves LoRA adapters only")
    if facts["dora"]:
        problems.append("DoRA (use_dora): vLLM does not support it; train plain LoRA, or merge it (export --merge)")
    if facts["modules_to_save"]:
        problems.append(f"modules_to_save {facts['modules_to_save']}: vLLM refuses adapters with fully trained modules")
    init = facts["init"]
    if isinstance(init, str) and init not in ("gaussian",):
        problems.append(f"init_lora_weights={init!r} changes the base weights; convert the adapter to plain LoRA first")
    targets = facts["target_modules"]
    names = [targets] if isinstance(targets, str) else list(targets or [])
    unknown = [t for t in names if t not in VLLM_MODULES and t != "all-linear"]
    if unknown:
        problems.append(f"target modules {unknown}: vLLM adapts {', '.join(sorted(VLLM_MODULES))}")
    if facts["bias"] != "none" or config.get("lora_bias"):
        flags.append("--enable-lora-bias")
        notes.append("the adapter trains biases: vLLM needs --enable-lora-bias")
    rank = facts["rank"]
    max_rank = next((r for r in VLLM_RANKS if r >= rank), None)
    if max_rank is None:
        problems.append(f"rank {rank}: above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    elif max_rank > VLLM_DEFAULT_MAX_RANK:
        flags.append(f"--max-lora-rank {max_rank}")
        notes.append(f"rank {rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}")
    try:
        base_path = resolve_model_path(base)
    except UserError:
        base_path = base
    name = run.resolve().name
    command = ["vllm", "serve", str(base_path), "--enable-lora", "--lora-modules", f"{name}={folder.resolve()}"]
    command += [part for flag in flags for part in flag.split()]
    return {
        "run": str(run),
        "adapter": str(folder),
        "ready": not problems,
        "problems": problems,
        "notes": notes,
        "method": method,
        "rank": rank,
        "target_modules": targets,
        "dora": facts["dora"],
        "modules_to_save": facts["modules_to_save"],
        "base_model": str(base_path),
        "command": shlex.join(command),
    }
