"""`tunelab bench`: tunelab's fast path against a transformers Trainer + peft baseline, in the same run.

data.py      the bundled, seeded instruction dataset (long-tailed lengths, English and Chinese)
baseline.py  the baseline phase: transformers Trainer + peft LoRA, fp32, pad to longest
fast.py      the fast phase: tunelab's own loop, packing on, precision auto
steps.py     per-step timing, losses and token counts, shared by both phases
phase.py     one phase in its own process (python -m tunelab.bench.phase), so its peak memory is its own
run.py       orchestration: spec, matmul peak, both phases, the combined JSON report
"""

from .run import run_bench

__all__ = ["run_bench"]
