"""Peak training memory, term by term, from the model's shape and the method's parameter counts.

The terms (bytes): frozen weights at their storage dtype (QLoRA: 4-bit NF4 + scales), trainable fp32
master weights, their gradients and AdamW's two moments; autocast's low-precision copies of the
weights that a forward holds until backward; activations saved for backward per transformer block
(per token, from the block's widths: attention, MLP, norms, the method's own branches) for every block,
or, with gradient checkpointing, each block's input plus one block recomputed; the LM-head/loss
buffers of the largest chunk of label positions; and a backward transient of two gradient tensors. On a CPU,
`loading_excess` is what loading the model (its fp32 weights and the mapped checkpoint) needs beyond all that:
the peak RSS of a small run is its load.

On a CPU the measured figure is the process's peak RSS, which also holds the Python/torch/tokenizer
runtime: that baseline is measured once per machine (tunelab.estimate.baseline) and added as its own
term, so the prediction is comparable with summary.json's peak_mem_bytes as it is.
The per-token activation coefficients come from counting what a llama-style block saves in fp32 and
under bf16 autocast; other architectures are approximated with the same widths.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import _PLAIN_HEAD_TYPES, CHUNK

# bytes per token and block, as (x hidden, x kv width, x intermediate): what autograd saves in a llama
# block (two RMSNorms in fp32, q/k/v/o projections, RoPE, attention, gated MLP). The MLP's SiLU output is not
# among them (training.gated_mlp recomputes it in backward): 4 bytes an intermediate feature fewer in fp32, 2 in
# bf16, counted with saved_tensors_hooks on tiny-llama (tests/test_estimate.py)
ACT_COEFF = {"fp32": (36, 12, 12), "low": (38, 10, 8)}
# packed rows on a CPU under autocast: tunelab.attention attends in fp32 (SDPA saves fp32 q, k, v and output
# where the unpacked model's bf16 SDPA saves bf16 ones), bytes more per token and block (x hidden, x kv width),
# counted with saved_tensors_hooks on tiny-llama (tests/test_estimate.py); in fp32 both save the same
PACKED_CPU_ATTENTION_BYTES = (4, 4)
# per adapted module's input feature, what a LoRA layer keeps of its input for A's gradient. peft's own modules
# (DoRA, QLoRA's 4-bit base, compiled or FSDP runs): the dropout output (fp32), its mask and, under autocast, the
# bf16 cast. training.fused_lora (every other LoRA layer): with dropout the masked input at the compute dtype and
# a boolean mask; without, the input at the compute dtype, one tensor for all the layers reading it (counted per
# layer here: an upper bound). The rank-wide A output (4 bytes a rank and token) is left out. Counted with
# saved_tensors_hooks (tests/test_estimate.py)
PEFT_LORA_INPUT_BYTES = {"fp32": 5, "low": 7}
FUSED_LORA_INPUT_BYTES = {(True, "fp32"): 5, (True, "low"): 3, (False, "fp32"): 4, (False, "low"): 2}
# under autocast a LoRA layer's output is fp32 (training.frozen.lora_sums_in_fp32), so part of what a gated MLP
# saves for backward (gate_proj's and up_proj's outputs, for training.gated_mlp's SiLU x up) is fp32 instead of
# bf16. Bytes more per token and intermediate feature, by (gate_proj adapted, up_proj adapted), as counted with
# saved_tensors_hooks on tiny-llama (tests/test_estimate.py); the attention projections and down_proj add
# nothing (their outputs are cast to bf16 for SDPA or added to the fp32 residual stream)
LORA_FP32_MLP_BYTES = {(True, True): 4, (True, False): 2, (False, True): 2, (False, False): 0}
ADAPTER_BYTES = 12  # per adapter and hidden feature: input, bottleneck in/out, residual
# per label position and vocab entry: logits (fp32 copy), log-softmax, its gradient; fitted to the measured
# tiny-llama cells (README matrix): ~12 bytes, less than the sum of the buffers (some are freed before the peak)
LOGIT_BYTES = {"fp32": 12, "low": 12}
# the label-position loss fuses the LM head with cross-entropy per chunk (losses.FusedLinearCrossEntropy): one
# chunk's fp32 logits turned into their softmax in place, plus its bf16 cast under autocast. Measured (peak RSS
# of one 1,024 x 49,152 chunk): 6.1 bytes bf16, 4.1 fp32; 8-9 before the softmax was made in place
FUSED_LOGIT_BYTES = {"fp32": 4, "low": 6}
TRAINING_RUNTIME = 40 * 2**20  # autograd engine, allocator arenas, the checkpoint write: measured, CPU
# the model's bound on a CPU load: the fp32 weights materialised and the safetensors file's mapped pages
# (resident once read: peak RSS counts them), 2 x 4 bytes a parameter. Measured apart since (summary.json's
# load_peak_mem_bytes), a smollm2 load peaks lower (1,082 MiB with LoRA's bf16 cast; a frozen fp32 base loads
# zero-copy), and the small cells' 1,2xx-1,4xx MiB peaks are training: the copies' measurement replaces this
# bound when a data file is given (estimate/depth.py)
LOAD_BYTES_PER_PARAM = 8
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + an 8-bit absmax per 64 weights + fp32 per 256 absmax
FP4_PLAIN_BYTES = 0.5 + 4 / 64  # without double quantization: an fp32 absmax per 64 weights


@dataclass
class Workload:
    """The largest micro-batch of the run: tokens in it, positions that carry a loss, rows."""

    tokens: int
    label_positions: int
    rows: int
    seq_len: int  # the longest row
    packed: bool = False  # rows of several examples, attended per example (tunelab.attention)


def lora_input_bytes(cfg, method, low: bool, quant_bits, strategy: str, cpu: bool) -> int:
    """Bytes per adapted module's input feature (see FUSED_LORA_INPUT_BYTES): as the trainer decides whether a
    LoRA layer runs as training.fused_lora's one function (an eager run, not sharded, a plain linear base)."""
    import torch

    from ..training.compiled import resolve_compile

    kind = "low" if low else "fp32"
    lora = getattr(cfg, "lora", None)
    # as the trainer decides: compiling applies to single-process runs only
    compiled = strategy == "single" and resolve_compile(cfg.train.compile, torch.device("cpu" if cpu else "cuda"))
    if lora is None or quant_bits or strategy == "fsdp" or compiled or not method.frozen_at_compute_dtype(cfg):
        return PEFT_LORA_INPUT_BYTES[kind]
    return FUSED_LORA_INPUT_BYTES[lora.dropout > 0, kind]


def _activations_per_block(
    shape, work, low: bool, lora_inputs_per_block: float, lora_bytes: int, adapters_per_block: int, cpu: bool
):
    kind = "low" if low else "fp32"
    a_h, a_kv, a_i = ACT_COEFF[kind]
    per_token = a_h * shape.hidden + a_kv * shape.kv_hidden + a_i * shape.intermediate
    if low and cpu and work.packed:
        per_token += PACKED_CPU_ATTENTION_BYTES[0] * shape.hidden + PACKED_CPU_ATTENTION_BYTES[1] * shape.kv_hidden
    per_token += lora_bytes * lora_inputs_per_block + ADAPTER_BYTES * shape.hidden * adapters_per_block
    return per_token * work.tokens


def loss_positions(shape, cfg, method, work: Workload) -> tuple[int, int, bool]:
    """(positions, outputs per position, whether the head runs on label positions only) of the loss's largest
    buffer: one chunk of label positions on the selected path, every token otherwise; classes for classification.
    Prompt learning takes the selected path for its loss, not for distillation (distill/loss.py) nor sharded
    (losses.head_on_labels)."""
    prompt_plain = method.virtual_tokens and (cfg.distill is not None or cfg.train.distributed == "fsdp")
    selected = shape.model_type in _PLAIN_HEAD_TYPES and cfg.task != "classification" and not prompt_plain
    positions = min(work.label_positions, CHUNK) if selected else work.tokens
    vocab = len(cfg.data.labels or [0, 0]) if cfg.task == "classification" else shape.vocab
    return positions, vocab, selected


def breakdown(
    shape,
    counts,
    cfg,
    method,
    precision: str,
    work: Workload,
    checkpointing: bool,
    lora_inputs: int,
    adapters: int,
    quant_bits: int | None,
    baseline: int,
    nproc: int = 1,
    strategy: str = "single",
    lora_fp32_outputs: int = 0,
    cpu: bool = True,
) -> dict:
    """Peak memory terms in bytes (one process); `strategy` ddp/fsdp: per rank of `nproc`. `lora_fp32_outputs`:
    the bytes per token, over all blocks, that the LoRA layers' fp32 outputs add under autocast (lora_output_bytes);
    `cpu`: the run trains on a CPU (packed rows attend in fp32 there)."""
    low = precision != "fp32"
    stored_low = stored_at_compute_dtype(cfg, method, precision, quant_bits, strategy)
    frozen = counts.total - counts.trainable
    per_frozen_linear = frozen_linear_bytes(cfg, method, precision, quant_bits, strategy)
    frozen_bytes = counts.frozen_block_linear * per_frozen_linear + (frozen - counts.frozen_block_linear) * 4
    shard = nproc if strategy == "fsdp" else 1
    terms = {
        "frozen_weights": frozen_bytes / shard,
        "trainable_weights": 4 * counts.trainable / shard,
        "gradients": 4 * counts.trainable / shard,
        "optimizer_states": 8 * counts.trainable / shard,
    }
    if strategy == "fsdp" and nproc > 1:  # one block gathered whole at a time, plus the prefetched next one
        block = (counts.block_linear * 4) / max(shape.layers, 1)
        terms["fsdp_gathered_blocks"] = 2 * block
    # autocast holds a low-precision copy of every weight a forward used until its backward ran;
    # bitsandbytes dequantizes its 4/8-bit weights per call instead
    head = shape.vocab * shape.hidden
    casts = 0
    if low:
        cast_blocks = 0 if quant_bits else counts.block_linear - (counts.frozen_block_linear if stored_low else 0)
        if checkpointing:
            cast_blocks /= max(shape.layers, 1)
        casts = 2 * (cast_blocks + head)
    terms["weight_casts"] = casts
    lora_bytes = lora_input_bytes(cfg, method, low, quant_bits, strategy, cpu) if lora_inputs else 0
    per_block = _activations_per_block(
        shape, work, low, lora_inputs / max(shape.layers, 1), lora_bytes, adapters // max(shape.layers, 1), cpu
    )
    if low:
        per_block += work.tokens * lora_fp32_outputs / max(shape.layers, 1)
    if checkpointing:
        terms["activations"] = shape.layers * work.tokens * shape.hidden * 4 + per_block
    else:
        terms["activations"] = shape.layers * per_block
    terms["activations"] += 3 * work.tokens * shape.hidden * 4  # embeddings, final norm
    positions, vocab, selected = loss_positions(shape, cfg, method, work)
    terms["logits_and_loss"] = (
        positions * vocab * (FUSED_LOGIT_BYTES if selected else LOGIT_BYTES)["low" if low else "fp32"]
    )
    terms["backward_transient"] = 2 * work.tokens * max(shape.hidden, shape.intermediate) * 4
    terms["training_runtime"] = TRAINING_RUNTIME if baseline else 0
    terms["runtime_baseline"] = baseline
    terms = {k: int(v) for k, v in terms.items()}
    terms["total"] = sum(terms.values())
    return terms


def frozen_linear_bytes(cfg, method, precision: str, quant_bits, strategy: str = "single") -> float:
    """Bytes a frozen block-linear weight is stored in: 4-bit NF4/FP4 or 8-bit for QLoRA, the compute dtype where
    tunelab.training.frozen holds it so, fp32 otherwise."""
    if quant_bits == 4:
        return NF4_BYTES if cfg.quant.double_quant else FP4_PLAIN_BYTES
    if quant_bits == 8:
        return 1 + 4 / 4096
    return 2 if stored_at_compute_dtype(cfg, method, precision, quant_bits, strategy) else 4


def stored_at_compute_dtype(cfg, method, precision: str, quant_bits, strategy: str = "single") -> bool:
    """Whether tunelab.training.frozen holds the frozen block linears at the compute dtype (low precision, not
    quantized, not sharded, a method that allows it)."""
    return precision != "fp32" and not quant_bits and strategy != "fsdp" and method.frozen_at_compute_dtype(cfg)


def block_state_bytes(counts, layers: int, per_frozen_linear: float) -> float:
    """Bytes a transformer block's linear weights hold for the whole run (one process, unsharded): the frozen ones
    at their storage dtype, the trainable ones as fp32 weight, gradient and AdamW's two moments. A deeper model's
    training peak is at least this much higher per block: the floor of the copies' extrapolation (estimate/depth.py)."""
    trainable = counts.block_linear - counts.frozen_block_linear
    return (16 * trainable + per_frozen_linear * counts.frozen_block_linear) / max(layers, 1)


def with_load(terms: dict, baseline: int, params: int) -> dict:
    """`terms` (a CPU peak: baseline > 0) with `loading_excess`, what loading the model needs beyond them (a
    CPU peak RSS also covers the load, before any of the training's terms exists)."""
    if not baseline:
        return terms
    excess = max(0, baseline + LOAD_BYTES_PER_PARAM * params - terms["total"])
    return terms | {"loading_excess": int(excess), "total": terms["total"] + int(excess)}


def lora_output_bytes(adapted) -> int:
    """Bytes per token that the fp32 outputs of LoRA layers add under autocast, from (module path, out features)
    of every adapted layer: per gated MLP (llama-style names; other MLPs are approximated as adding nothing)."""
    mlps: dict[str, dict[str, int]] = {}
    for path, out in adapted:
        parent, _, name = path.rpartition(".")
        mlps.setdefault(parent, {})[name] = out
    total = 0
    for names in mlps.values():
        width = names.get("gate_proj") or names.get("up_proj") or 0
        total += LORA_FP32_MLP_BYTES["gate_proj" in names, "up_proj" in names] * width
    return total
