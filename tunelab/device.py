"""Device and precision choice in one place, and peak-memory measurement.

CPUs here differ between machines: with AVX512-BF16 or AMX, bf16 matmuls are fast; on an AVX2-only CPU
torch falls back to a scalar bf16 GEMM about 100x slower than fp32. So `precision: auto` detects the
capability instead of assuming it. `TUNELAB_CPU_BF16=0|1` overrides the detection (tests force both
branches with it; a user can pin the fp32 path on a bf16 CPU).
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import warnings

import torch


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


CPU_BF16_ENV = "TUNELAB_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), or as TUNELAB_CPU_BF16 says."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _detected_native_bf16()


def _cpu_supports(torch_checks: tuple[str, ...], flags: tuple[str, ...]) -> bool:
    """torch.cpu's own checks where this torch has them, else the CPU flags in /proc/cpuinfo."""
    checks = [getattr(torch.cpu, name, None) for name in torch_checks]
    if any(c is not None for c in checks):
        return any(bool(c()) for c in checks if c is not None)
    try:  # older torch: read the CPU flags
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f" {flag}" in text for flag in flags)


@functools.cache
def _detected_native_bf16() -> bool:
    return _cpu_supports(("_is_avx512_bf16_supported", "_is_amx_tile_supported"), ("avx512_bf16", "amx_bf16"))


@functools.cache
def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles (Intel Sapphire Rapids and later): bf16 and int8 matrix units beside
    AVX512-BF16. Some choices differ between AMX and AVX512-BF16 alone (AMD Zen 4), so they are told apart."""
    return _cpu_supports(("_is_amx_tile_supported",), ("amx_tile",))


def cpu_capability() -> str:
    """torch's vector ISA plus what decides bf16 speed, e.g. AVX2, AVX512+bf16, AVX512+amx+bf16."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cpu_has_amx():
        cap += "+amx"
    return f"{cap}+bf16" if cpu_has_native_bf16() else cap


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map `auto|fp32|bf16|fp16` to what will actually run on this device."""
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "fp16":
        warnings.warn("fp16 is not supported for CPU training; using fp32", stacklevel=2)
        return "fp32"
    if requested == "bf16" and not cpu_has_native_bf16():
        warnings.warn(
            "precision bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): matmuls run in a slow "
            "fallback (about 100x slower than fp32). Use precision: auto or fp32.",
            stacklevel=2,
        )
    return requested


# the one precision name -> torch dtype map
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    return DTYPES[precision]


def autocast_dtype(precision: str):
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    return None if precision == "fp32" else DTYPES[precision]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it measures: CUDA max allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "rss"


_peak_before_restart = 0  # the process's peak RSS before the last restart_rss_peak()


def _vm_hwm() -> int | None:
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's own peak RSS. On Linux, VmHWM of /proc/self/status: ru_maxrss survives exec, so a run
    started by a large process (a test runner, a notebook) would report the parent's RSS at fork instead."""
    hwm = _vm_hwm()
    if hwm is not None:
        return max(hwm, _peak_before_restart)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # KiB on Linux, bytes on macOS


@functools.cache
def _libc():
    """glibc's functions, or None (another C library, no C library found)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim); False where there is no glibc. Loading a
    model frees far more than it keeps (the checkpoint's fp32 tensors, a 4-bit quantization's temporaries), and
    how much of that glibc had returned varied from process to process: a QLoRA copy's training peak RSS followed
    its load peak (1,046-1,164 MiB over load peaks of 763-915, five identical processes)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
KEEP_TOP = 2**31 - 1  # mallopt takes an int: free memory at the heap's top above 2 GiB is still returned
# glibc's own starting values, set back when a run ends (its adjustment of the thresholds stays off once set)
DEFAULT_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def keep_freed_memory(keep: bool = True) -> bool:
    """From now on glibc keeps the memory a training step frees for the next step, instead of returning it to
    the OS and faulting it in again, zeroed, page by page: no allocation is mmapped (a step's large tensors,
    an embedding's gradient among them, each munmapped when freed) and the heap's top is not trimmed. Measured
    on smollm2 full fine-tuning at 4 x 256 (2-core AMX Xeon, README): 3.6M minor page faults in 11 steps -> 1.0M,
    the median step 6-16% shorter, peak RSS +0-2%; and the estimator's copies, stepped by turns in one process,
    took steps as steady as each alone. Not for every step: LoRA's, which fault far less, did not move, and a
    prefix-tuning step's heap fragmented (tiny-llama at 4 x 256: peak 1,118 -> 1,670 MiB). `keep=False` sets
    glibc's starting values back (Trainer.close, after returning what the run kept). False where nothing was
    set: no glibc, or the user set glibc's allocator themselves (MALLOC_*_ or GLIBC_TUNABLES:
    `MALLOC_MMAP_THRESHOLD_=131072` hands an FSDP rank's gathered blocks back, README)."""
    libc = _libc()
    if libc is None or allocator_set_by_user():
        return False
    if keep:
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_TOP))
    return all(
        libc.mallopt(param, value)
        for param, value in (
            (M_MMAP_MAX, DEFAULT_MMAP_MAX),
            (M_MMAP_THRESHOLD, DEFAULT_THRESHOLD),
            (M_TRIM_THRESHOLD, DEFAULT_THRESHOLD),
        )
    )


def keeps_step_memory(device, method) -> bool:
    """Whether a run of `method` on `device` has glibc keep what a step frees (keep_freed_memory): methods that
    free whole weights' gradients every step, on a CPU, where glibc is there and the user left its allocator
    alone. The trainer and the estimator's copies decide by it."""
    return (
        device.type == "cpu" and method.frees_weight_gradients and _libc() is not None and not allocator_set_by_user()
    )


_RELEASE_SETTINGS = ("mmap_threshold", "trim_threshold", "mmap_max", "top_pad")  # when glibc returns memory


def allocator_set_by_user() -> bool:
    """Whether this process was started with glibc told when to return memory (MALLOC_MMAP_THRESHOLD_ and
    its kin, or the same settings in GLIBC_TUNABLES)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(
        f"MALLOC_{name.upper()}_" in os.environ or f"glibc.malloc.{name}" in tunables for name in _RELEASE_SETTINGS
    )


def restart_rss_peak() -> int | None:
    """Start measuring a new peak RSS from now (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the
    current RSS), read with `rss_peak_since_restart`; `peak_rss_bytes` still covers the whole process. Returns
    the peak so far, or None where the peak cannot be reset."""
    global _peak_before_restart
    hwm = _vm_hwm()
    if hwm is None:
        return None
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    _peak_before_restart = max(_peak_before_restart, hwm)
    return _peak_before_restart


def rss_peak_since_restart() -> int | None:
    return _vm_hwm()
