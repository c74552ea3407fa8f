"""Pruning a merged model.

- Layer pruning (ShortGPT, Men et al. 2024): a block's influence is 1 - cos(its input, its output) averaged
  over the tokens of a calibration sample; the blocks that change their hidden states least are removed.
  The model gets really smaller and faster (fewer blocks run). A short LoRA run can heal it afterwards.
- Magnitude pruning: the smallest |w| of each decoder linear weight set to zero (torch.nn.utils.prune), made
  permanent. The tensors stay dense, so dense kernels run exactly as fast as before.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..blocks import keep_blocks
from ..errors import UserError
from ..log import log
from ..methods.full import transformer_blocks


@torch.no_grad()
def block_influence(model, batches: list[dict]) -> list[float]:
    """Per decoder block: mean over real tokens of 1 - cos(input hidden state, output hidden state)."""
    _, blocks = transformer_blocks(model)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = 0
    mask_now: list = [None]
    hooks = []

    def hook(index):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            totals[index] += ((1 - cos) * mask_now[0]).sum().double()

        return fn

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(hook(i), with_kwargs=True))
    try:
        for batch in batches:
            mask_now[0] = batch["attention_mask"].float()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tokens += int(batch["attention_mask"].sum())
    finally:
        for h in hooks:
            h.remove()
    return (totals / max(tokens, 1)).tolist()


def prune_layers(model, n: int, batches: list[dict]) -> tuple:
    """The model without its `n` least influential blocks (a copy), and what was measured and removed."""
    count = len(transformer_blocks(model)[1])
    if not 0 < n < count:
        raise UserError(f"--prune-layers {n}: the model has {count} decoder blocks; remove between 1 and {count - 1}")
    influence = block_influence(model, batches)
    removed = sorted(sorted(range(count), key=lambda i: influence[i])[:n])
    model = keep_blocks(model, [i for i in range(count) if i not in removed])
    return model, {
        "blocks_before": count,
        "blocks_after": count - n,
        "removed_blocks": removed,
        "block_influence": [round(v, 6) for v in influence],
    }


def magnitude_prune(model, amount: float) -> dict:
    """Zero the `amount` fraction of smallest-magnitude weights in each decoder linear layer, permanently."""
    from torch.nn.utils import prune

    if not 0 < amount < 1:
        raise UserError(f"--prune {amount}: the fraction of weights to zero must be between 0 and 1")
    layers = [m for m in transformer_blocks(model)[1].modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        prune.l1_unstructured(layer, "weight", amount=amount)
        prune.remove(layer, "weight")  # weight = weight_orig * mask, the mask dropped: a plain dense tensor again
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    everything = sum(p.numel() for p in model.parameters())
    return {
        "amount": amount,
        "linear_sparsity": zeros / total,
        "model_sparsity": zeros / everything,
        "note": "weights are zeroed but stored and multiplied densely: no smaller files and no speed-up on dense "
        "kernels (that needs sparse kernels or structured pruning such as --prune-layers)",
    }


def heal(model, tokenizer, cfg, steps: int, progress: bool = True):
    """A short LoRA run (all linear layers) on the pruned model with the run's training data, merged back in."""
    import tunelab

    from .merge import adapter_on

    with tempfile.TemporaryDirectory(prefix="tunelab-heal-") as tmp:
        base_dir = Path(tmp) / "pruned"
        model.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)
        full = cfg.to_dict()
        keep = ("batch_size", "lr", "precision", "packing", "grad_accum", "weight_decay", "max_grad_norm")
        train = {k: v for k, v in full["train"].items() if k in keep}
        heal_cfg = {
            "model": str(base_dir),
            "method": "lora",
            "seed": cfg.seed,
            "out_dir": str(Path(tmp) / "runs"),
            "run_name": "heal",
            "data": full["data"],
            "train": train | {"max_steps": steps, "warmup_ratio": 0.1, "scheduler": "cosine"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "eval": {"generate": False},
        }
        log(f"healing: {steps} LoRA steps on the pruned model")
        result = tunelab.train(heal_cfg, progress=progress)
        from ..config import load_config
        from ..models import load_causal_lm

        heal_run = Path(result.run_dir)
        run_cfg = load_config(heal_run / "config.yaml", saved_run=True)
        base = load_causal_lm(str(base_dir), torch.device("cpu"))
        healed = adapter_on(base, heal_run, run_cfg).merge_and_unload().eval()
        return healed, {"heal_steps": steps, "heal_final_train_loss": result.summary.get("final_train_loss")}
