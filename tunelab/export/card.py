"""The export's model card (README.md): what it is, where it came from, how it was measured, how to load it."""

from __future__ import annotations


def _metrics(summary: dict) -> str:
    evals = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
    rows = [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in evals.items() if k != "step"]
    if isinstance(summary.get("final_train_loss"), float):
        rows.insert(0, f"- final train loss: {summary['final_train_loss']:.4g}")
    return "\n".join(rows) or "- (none recorded)"


def _usage(info: dict) -> str:
    kind, base = info["layout"], info["base"]
    if kind == "adapter":
        return f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
```

vLLM: `vllm serve {base} --enable-lora --lora-modules {info["name"]}=PATH/TO/THIS/FOLDER`
(`tunelab serve --check RUN` says whether the adapter suits it)."""
    if kind == "int8":
        return """```python
from tunelab.export.quantize import load_int8

model, tokenizer = load_int8("PATH/TO/THIS/FOLDER")  # runtime="dequant" (default), "torch" (faster, int8 activations too) or "torchao"
```

The weights are int8 with one fp32 scale per output row (`model-int8.safetensors`, `int8.json` lists the
quantized layers); no pickle anywhere."""
    if kind in ("gguf", "ollama"):
        text = f"""llama.cpp: `llama-cli -m {info["gguf"]} -cnv` (the chat template is in the file).

transformers (dequantized to fp32): `AutoModelForCausalLM.from_pretrained("PATH", gguf_file="{info["gguf"]}")`."""
        if kind == "ollama":
            text += "\n\nOllama: `ollama create NAME -f Modelfile`, then `ollama run NAME`."
        return text
    return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")  # the run's chat template included
```

No tunelab or peft needed."""


def model_card(info: dict, cfg, summary: dict, parity: dict) -> str:
    lines = [
        f"# {info['name']}",
        "",
        f"Exported by `tunelab export` from the run `{info['run']}`: {info['description']}.",
        "",
        "## Provenance",
        "",
        f"- base model: `{cfg.model}`",
        f"- method: `{cfg.method}`"
        + (f" ({summary.get('trainable_params'):,} trainable parameters)" if summary.get("trainable_params") else ""),
        f"- training data: `{cfg.data.train}`"
        + (f", validation `{cfg.data.eval}`" if cfg.data.eval else f", validation fraction {cfg.data.val_fraction}"),
        f"- steps: {summary.get('steps')}, lr {cfg.train.lr}, precision {summary.get('precision', cfg.train.precision)}",
    ]
    if info.get("merged_into"):
        lines.append(f"- merged into: {info['merged_into']}")
    for note in info.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "## Training metrics", "", _metrics(summary), "", "## Parity with the trained model", ""]
    lines.append(
        f"On {parity['conversations']} fixed conversations ({parity['positions']} token positions): mean KL "
        f"{parity['mean_kl']:.3g} nats/token (tolerance for a {parity['kind']} export: {parity['tolerance_mean_kl']:g}), "
        f"greedy-token agreement {parity['greedy_token_agreement']:.2%}, same greedy answers "
        f"{parity['same_greedy_answers']}/{parity['conversations']}."
    )
    if "exact_match" in parity:
        em = parity["exact_match"]
        lines.append(f"Exact match: trained {em['trained']:.3f}, export {em['export']:.3f}.")
    if not parity["within_tolerance"]:
        lines.append("\n**Warning: this export drifts past the tolerance of its kind.**")
    lines += [
        "",
        "`parity.json` has every number and a few example answers.",
        "",
        "## How to load it",
        "",
        _usage(info),
        "",
    ]
    return "\n".join(lines)
