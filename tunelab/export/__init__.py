"""`tunelab export RUN --out DIR`: the trained model in a form that runs without tunelab.

Layouts: the adapter alone (default), a merged transformers model (`--merge`), a GGUF file (`--format gguf`,
f16 or q8_0) and an Ollama Modelfile beside it (`--format ollama`), int8 for CPU inference
(`--quantize int8`), NF4 through bitsandbytes (`--quantize nf4`); optionally layer-pruned (`--prune-layers N`,
then `--heal-steps`) or magnitude-pruned (`--prune AMOUNT`). Every export is reloaded from DIR and compared
with the trained model (`DIR/parity.json`, a printed table; see parity.py), and gets a model card (README.md).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text, dir_bytes, normal_modes, read_json_object
from ..log import log

FORMATS = ("hf", "gguf", "ollama")
QUANTIZE = ("int8", "q8_0", "f16", "nf4")
GGUF_NAME = "model.gguf"


def _check_options(fmt, merge, quantize, prune_layers, prune, heal_steps) -> bool:
    """Whether the export merges (GGUF, quantization and pruning need a whole model); bad combinations are errors."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE)}")
    if quantize in ("q8_0", "f16") and fmt == "hf":
        raise UserError(f"--quantize {quantize} is a GGUF type: add --format gguf (or ollama)")
    if quantize in ("int8", "nf4") and fmt != "hf":
        raise UserError(f"--quantize {quantize} writes a transformers-style folder: use it with --format hf")
    if prune_layers is not None and prune is not None:
        raise UserError("--prune-layers and --prune are alternatives: choose one")
    if heal_steps and prune_layers is None and prune is None:
        raise UserError("--heal-steps heals a pruned model: add --prune-layers N or --prune AMOUNT")
    if heal_steps is not None and heal_steps < 0:
        raise UserError(f"--heal-steps must be >= 0, got {heal_steps}")
    return merge or fmt != "hf" or quantize is not None or prune_layers is not None or prune is not None


def _conversations(cfg, tokenizer, prompts, limit):
    from ..data import prepare_data
    from ..data.formats import load_examples
    from .parity import conversations

    if prompts:
        examples = load_examples(prompts, "auto", False)[0]
        source = str(prompts)
    else:
        examples = prepare_data(cfg, tokenizer).val_examples
        source = "the run's validation split"
    convs = conversations(examples, limit)
    if not convs:
        raise UserError("parity needs prompts: the run has no validation split; pass --prompts FILE")
    return convs, source


def _calibration(cfg, tokenizer, n: int = 32) -> list[dict]:
    from ..data import prepare_data

    encoded = prepare_data(cfg, tokenizer).train[:n]
    return [
        {
            "input_ids": torch.tensor([e["input_ids"]]),
            "attention_mask": torch.ones(1, len(e["input_ids"]), dtype=torch.long),
        }
        for e in encoded
    ]


def _timed(load):
    t0 = time.perf_counter()
    result = load()
    return result, time.perf_counter() - t0


def export_run(
    run,
    out,
    fmt: str = "hf",
    merge: bool = False,
    quantize: str | None = None,
    prune_layers: int | None = None,
    prune: float | None = None,
    heal_steps: int = 0,
    prompts=None,
    max_prompts: int | None = 16,
    progress: bool = True,
) -> dict:
    """Export `run` into `out` (a new or empty folder); returns the report also written to out/parity.json."""
    from ..loading import is_run_dir, load
    from ..methods import get_method
    from .card import model_card
    from .merge import check_mergeable, is_quantized_base, merged_model
    from .parity import compare, print_report

    run, out = Path(run), Path(out)
    merge = _check_options(fmt, merge, quantize, prune_layers, prune, heal_steps)
    if not is_run_dir(run):
        raise UserError(f"{run}: not a finished run folder (config.yaml and summary.json)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder (an export never overwrites)")
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise UserError(f"--out {out}: inside the run folder; export somewhere else")
    trained, tokenizer = load(run, device=torch.device("cpu"))
    cfg = trained.tunelab_config
    if cfg.task != "causal_lm":
        raise UserError(f"tunelab export handles causal LM runs; this run's task is '{cfg.task}'")
    summary = read_json_object(run / "summary.json")
    method = get_method(cfg.method)
    convs, source = _conversations(cfg, tokenizer, prompts, max_prompts)
    info = {"run": str(run), "name": f"{cfg.run_name or run.name}-export", "base": cfg.model, "notes": []}
    out.mkdir(parents=True, exist_ok=True)

    if not merge:
        if method.artifact != "adapter":
            raise UserError(f"method '{cfg.method}' trains the whole model: export it with --merge (a plain model)")
        shutil.copytree(run / method.artifact, out, dirs_exist_ok=True)
        tokenizer.save_pretrained(out)
        exported, load_s = _timed(lambda: method.load(method.load_base(cfg, torch.device("cpu")), out, cfg).eval())
        kind, info["layout"], info["description"] = "adapter", "adapter", f"the {cfg.method} adapter alone"
    else:
        check_mergeable(cfg)
        model, info["merged_into"] = merged_model(run, cfg, trained)
        kind = "merged-quantized-base" if is_quantized_base(cfg) else "merged"
        if is_quantized_base(cfg):
            info["notes"].append(
                "the merged weights are the dequantized 4-bit weights + the adapter, in fp32: next to the 4-bit "
                "model it was trained on they drift by the 4-bit kernel's rounding (see parity)"
            )
        model, info["pruning"] = _prune(model, tokenizer, cfg, prune_layers, prune, heal_steps, progress)
        if prune_layers is not None:
            kind = "layer-pruned"
        elif prune is not None:
            kind = "magnitude-pruned"
        exported, load_s, kind = _write(model, tokenizer, cfg, out, fmt, quantize, kind, info)

    report = compare(
        trained, exported, tokenizer, convs, cfg.data.system_prompt, kind, min(cfg.eval.max_new_tokens, 32)
    )
    report.update(
        {
            "prompts": source,
            "format": fmt,
            "layout": info["layout"],
            "export_dir": str(out),
            "export_bytes": dir_bytes(out),
            "export_load_s": round(load_s, 3),
            **{k: v for k, v in info.items() if k in ("merged_into", "pruning", "int8", "gguf_tokenizer_agreement")},
        }
    )
    atomic_write_json(out / "parity.json", report)
    atomic_write_text(out / "README.md", model_card(info, cfg, summary, report))
    normal_modes(out)  # safetensors and tempfile write private files: a model is there to be shared
    print_report(report)
    return report


def _prune(model, tokenizer, cfg, prune_layers, prune, heal_steps, progress):
    from .prune import heal, magnitude_prune
    from .prune import prune_layers as remove_blocks

    if prune_layers is None and prune is None:
        return model, None
    if prune_layers is not None:
        model, result = remove_blocks(model, prune_layers, _calibration(cfg, tokenizer))
        log(f"pruned blocks {result['removed_blocks']}: {result['blocks_before']} -> {result['blocks_after']} blocks")
    else:
        result = magnitude_prune(model, prune)
        log(
            f"magnitude pruning: {result['linear_sparsity']:.1%} of the decoder's linear weights are zero; {result['note']}"
        )
    if heal_steps:
        healed, healing = heal(model, tokenizer, cfg, heal_steps, progress)
        model.load_state_dict(healed.state_dict())
        result.update(healing)
    return model, result


def _write(model, tokenizer, cfg, out: Path, fmt, quantize, kind, info):
    """Write the merged (maybe pruned) model in its layout; returns (the export reloaded from out, load seconds, kind)."""
    from .gguf_file import load_gguf, write_gguf
    from .merge import save_plain_model
    from .modelfile import modelfile_text

    pruned = kind in ("layer-pruned", "magnitude-pruned")
    if fmt == "hf" and quantize is None:
        save_plain_model(model, tokenizer, out)
        from transformers import AutoModelForCausalLM

        exported, load_s = _timed(lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
        info["layout"], info["description"] = "hf", "a plain transformers model (adapter merged)"
        return exported, load_s, kind
    if quantize == "int8":
        from .quantize import load_int8, save_int8

        info["int8"] = save_int8(model, tokenizer, out)
        info["int8"]["linear_ratio"] = round(info["int8"]["linear_fp32_bytes"] / info["int8"]["linear_int8_bytes"], 3)
        exported, load_s = _timed(lambda: load_int8(out)[0])
        info["layout"], info["description"] = "int8", "int8 weights for CPU inference (adapter merged)"
        return exported, load_s, kind if pruned else "int8"
    if quantize == "nf4":
        return _nf4(model, tokenizer, out, info, kind if pruned else "nf4")
    outtype = quantize or "f16"
    path = write_gguf(model, tokenizer, out / GGUF_NAME, outtype, name=info["name"])
    (exported, gguf_tokenizer), load_s = _timed(lambda: load_gguf(path))
    info["gguf"] = GGUF_NAME
    info["gguf_tokenizer_agreement"] = _tokenizer_agreement(tokenizer, gguf_tokenizer)
    info["layout"], info["description"] = fmt, f"a GGUF file ({outtype}, adapter merged)"
    if fmt == "ollama":
        atomic_write_text(
            out / "Modelfile", modelfile_text(tokenizer, tokenizer.chat_template, GGUF_NAME, cfg.data.system_prompt)
        )
        info["description"] += " and an Ollama Modelfile"
    return exported, load_s, kind if pruned else f"gguf-{outtype}"


def _tokenizer_agreement(tokenizer, other) -> float:
    """The fraction of probe texts the GGUF's tokenizer splits as the run's does."""
    from .gguf_file import _PROBE

    texts = [_PROBE, "Normalise this date: 3rd of March 2024", "红色 蓝色 <|im_start|>user\nhi<|im_end|>"]
    same = [tokenizer.encode(t, add_special_tokens=False) == other.encode(t, add_special_tokens=False) for t in texts]
    return sum(same) / len(same)


def _nf4(model, tokenizer, out, info, kind):
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..quant import use_generic_4bit_kernel
    from .merge import save_plain_model

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="tunelab-nf4-") as tmp:
        save_plain_model(model, tokenizer, Path(tmp))
        quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config, device_map={"": "cpu"})
        quantized.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    def reload():
        m = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
        use_generic_4bit_kernel(m)
        return m.eval()

    exported, load_s = _timed(reload)
    info["layout"], info["description"] = "hf", "NF4 weights through bitsandbytes (adapter merged)"
    info["notes"].append("loads with transformers + bitsandbytes (`from_pretrained` reads its quantization config)")
    return exported, load_s, kind
