"""bitsandbytes in one place: quiet import, and its packed CPU 4-bit kernel kept out of the way.

On CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit`'s weight for a fused bf16 kernel at its
first no-grad forward in eval mode (an evaluation, a generation). tunelab keeps every 4-bit layer on
the generic kernel instead, because the packed path
- crashes (`shape '[32, 0]' is invalid`) on layers whose sizes do not divide its tiles (32 output rows,
  one quantization block of inputs): small or odd-shaped models;
- stays packed afterwards, and the packed kernel has no backward: after one periodic evaluation a
  QLoRA run's base layers stop passing gradients (tested);
- rounds the quantization scales to bf16 on the way, so the weights differ from those trained against.
The generic kernel holds the same 4-bit weights in the same memory, on every CPU.
"""

from __future__ import annotations

import logging

PACKED_TILE_ROWS = 32  # bitsandbytes' block_n in _convert_weight_packed_for_cpu


class _DropHubKernelWarning(logging.Filter):
    # bitsandbytes tries to fetch a CPU kernel from the hub at import on AVX512-BF16 CPUs and warns on
    # every run when it cannot; nothing is fetched at run time here, and its own kernel is used instead
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_bitsandbytes_logs() -> None:
    """Install the filter before bitsandbytes is imported (peft and transformers import it lazily)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropHubKernelWarning) for f in logger.filters):
        logger.addFilter(_DropHubKernelWarning())


def packed_cpu_kernel_fits(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU repacking can take a weight of this shape."""
    return out_features % PACKED_TILE_ROWS == 0 and in_features % blocksize == 0 and in_features % 2 == 0


def use_generic_4bit_kernel(model) -> tuple[int, list[str]]:
    """Turn bitsandbytes' packed CPU kernel off for every 4-bit layer. Returns how many layers it would
    have taken (0 on CPUs without AVX512-BF16) and the names of those among them whose shape would
    have crashed it."""
    import bitsandbytes as bnb

    would_pack, misfits = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        module.support_avx512bf16_for_cpu = False
        would_pack += 1
        state = module.weight.quant_state
        if not packed_cpu_kernel_fits(*state.shape, state.blocksize):
            misfits.append(name)
    return would_pack, misfits
