"""A GGUF file (llama.cpp / Ollama) of a plain Llama-family model, written with the `gguf` package.

Tensor names and the q/k row permutation follow llama.cpp's convert_hf_to_gguf.py (`LlamaModel`): llama.cpp
applies rotary embeddings to interleaved pairs, transformers to the two halves of each head, so q_proj and
k_proj rows are reordered per head (transformers' GGUF reader undoes it). The byte-level BPE vocabulary,
its merges, special tokens and the chat template go in as convert_hf_to_gguf.py writes them; the
pre-tokenizer is named by the same fingerprint it uses (the token ids of a fixed probe text).
"""

from __future__ import annotations

import os
import tempfile
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io import created_mode
from ..log import log

OUTTYPES = ("f16", "q8_0")

# convert_hf_to_gguf.py's probe text and the pre-tokenizers it names by the hash of its token ids (a subset:
# the byte-level BPE vocabularies of Llama-family models)
_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}


def pre_tokenizer_name(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(_PROBE, add_special_tokens=False)).encode()).hexdigest()
    name = _PRE_BY_HASH.get(digest)
    if name is None:
        log(
            f"warning: the tokenizer's pre-tokenizer is not one llama.cpp names (hash {digest[:12]}); GGUF says 'default'"
        )
    return name or "default"


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: halves of each head -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def check_llama(model) -> None:
    config = model.config
    if config.model_type != "llama":
        raise UserError(
            f"GGUF export covers the Llama family (the default model's architecture); this model is "
            f"'{config.model_type}' (llama.cpp's convert_hf_to_gguf.py converts the merged export: --format hf --merge)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export: rope scaling '{rope.get('rope_type')}' is not written yet (default rope only)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: a Llama model with attention/MLP biases is not written yet")


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE" or "ByteLevel" not in str(backend.decoder):
        raise UserError("GGUF export: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3) are written")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tensor(name: str, weight: torch.Tensor, outtype: str):
    """(data, raw_dtype) as convert_hf_to_gguf.py stores it: 1-D tensors (norms) stay f32."""
    import gguf

    data = weight.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1:
        return data, None
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(model, tokenizer, path: Path, outtype: str = "f16", name: str = "tunelab export") -> Path:
    """Write `model` (a plain LlamaForCausalLM) and `tokenizer` (with its chat template) to `path`, atomically."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"GGUF export: --quantize {outtype} is not a GGUF type; choose one of {', '.join(OUTTYPES)}")
    check_llama(model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope_theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(float(rope_theta))
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        tokens, types = _vocab(tokenizer, c.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
        w.add_token_list(tokens)
        w.add_token_types(types)
        with tempfile.TemporaryDirectory() as tok_dir:  # SpecialVocab reads merges and special ids from the files
            tokenizer.save_pretrained(tok_dir)
            special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=c.vocab_size)
        if tokenizer.pad_token_id is not None:
            special.special_token_ids["pad"] = tokenizer.pad_token_id
        special.chat_template = tokenizer.chat_template
        special.add_to_gguf(w, quiet=True)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
        tied = bool(getattr(c, "tie_word_embeddings", False))
        for hf_name, weight in model.state_dict().items():
            if hf_name == "lm_head.weight" and tied:
                continue  # llama.cpp uses token_embd for a tied output (and transformers' reader ties it back)
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
            if hf_name.endswith("q_proj.weight"):
                weight = permute_qk(weight, c.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                weight = permute_qk(weight, c.num_attention_heads, c.num_key_value_heads)
            data, raw_dtype = _tensor(gguf_name, weight, outtype)
            w.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, created_mode())  # mkstemp's file is private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_gguf(path: Path):
    """(model, tokenizer) read back by transformers' GGUF reader (weights dequantized to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None
    return model.eval(), tokenizer
