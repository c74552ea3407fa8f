"""The README demo: a generated date-normalisation task, before/after a short LoRA fine-tune."""
