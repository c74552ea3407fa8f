"""The teacher's logits of every training example, computed once and stored in the run in chunks.

`RUN/teacher-logits/chunk-00000.safetensors`, ... each hold `cache_chunk` examples: for a causal LM the top-k
logits of every label token (`values` float32, `ids` int32, `offsets`: where each example's tokens start),
for classification every class's logit (`values`, one row per example). Files are opened lazily, so the
cache need not fit in memory; a resumed run reads the same files back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..data.collate import pad_batch
from ..errors import UserError
from ..io import atomic_write_bytes, atomic_write_json
from ..log import log
from .loss import _logits, label_features

CACHE_DIR = "teacher-logits"
INFO_FILE = "cache.json"


@torch.no_grad()
def _chunk_logits(teacher, examples: list[dict], top_k: int, batch_size: int, pad_id: int, device, autocast):
    values, ids, counts = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            if batch["labels"].dim() == 1:
                values.append(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
                continue
            features, head, _ = label_features(teacher, batch)
            top = _logits(features, head).float().topk(min(top_k, teacher.config.vocab_size), dim=-1)
        values.append(top.values)
        ids.append(top.indices.to(torch.int32))
        counts += (batch["labels"][:, 1:] != -100).sum(1).tolist()
    out = {"values": torch.cat(values).float().cpu().contiguous()}
    if ids:
        out["ids"] = torch.cat(ids).cpu().contiguous()
        out["offsets"] = torch.tensor([0, *counts]).cumsum(0)
    return out


def write_cache(run_dir: Path, teacher, examples: list[dict], options, batch_size, pad_id, device, autocast):
    """Compute and write the cache of `examples` (the training split, in its order)."""
    from tqdm import tqdm

    folder = run_dir / CACHE_DIR
    folder.mkdir(exist_ok=True)
    n_chunks = math.ceil(len(examples) / options.cache_chunk)
    log(f"teacher logits: {len(examples)} examples, once, into {folder} ({n_chunks} file(s))")
    for c in tqdm(range(n_chunks), desc="teacher", unit="chunk", disable=n_chunks < 2):
        part = examples[c * options.cache_chunk : (c + 1) * options.cache_chunk]
        tensors = _chunk_logits(teacher, part, options.top_k, batch_size, pad_id, device, autocast)
        atomic_write_bytes(folder / f"chunk-{c:05d}.safetensors", save(tensors))
    atomic_write_json(
        folder / INFO_FILE, {"examples": len(examples), "chunk": options.cache_chunk, "top_k": options.top_k}
    )


class TeacherCache:
    """Cached teacher logits of the training examples, looked up by example index."""

    def __init__(self, run_dir: Path, n_examples: int, options):
        folder = run_dir / CACHE_DIR
        try:
            info = json.loads((folder / INFO_FILE).read_text())
        except (OSError, ValueError):
            raise UserError(f"{folder}: no complete teacher-logits cache (it cannot be rebuilt mid-run)") from None
        if info.get("examples") != n_examples or info.get("chunk") != options.cache_chunk:
            raise UserError(f"{folder}: the cache holds {info.get('examples')} examples, the run has {n_examples}")
        self.chunk = options.cache_chunk
        self.files = [
            safe_open(str(folder / f"chunk-{c:05d}.safetensors"), framework="pt")
            for c in range(math.ceil(n_examples / self.chunk))
        ]
        self.offsets = [f.get_tensor("offsets").tolist() if "offsets" in f.keys() else None for f in self.files]

    def lookup(self, indices: list[int], device):
        """The cached teacher of these examples, concatenated in this order: a TopK pair (causal LM) or logits."""
        values, ids = [], []
        for i in indices:
            c, j = divmod(i, self.chunk)
            f, offsets = self.files[c], self.offsets[c]
            rows = slice(j, j + 1) if offsets is None else slice(offsets[j], offsets[j + 1])
            values.append(f.get_slice("values")[rows])
            if offsets is not None:
                ids.append(f.get_slice("ids")[rows])
        if not ids:
            return torch.cat(values).to(device)
        return torch.cat(values).to(device), torch.cat(ids).to(device)
