"""Exact and near duplicates inside a data set and between training and evaluation data (leakage).

Texts are compared after normalisation (case folded, whitespace collapsed) as sets of character 5-grams,
which works for Chinese as for English. Near-duplicate candidates come from MinHash LSH (datasketch) at a
threshold below the reported one, so pairs near it are not missed; each candidate's Jaccard similarity is
then computed exactly and the pair is kept at `threshold` or above.
"""

from __future__ import annotations

import re

from datasketch import MinHash, MinHashLSH

SHINGLE = 5
NUM_PERM = 128
CANDIDATE_MARGIN = 0.2  # LSH threshold = threshold - margin: recall first, exact Jaccard decides


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


def shingles(text: str) -> set[str]:
    text = normalise(text)
    if len(text) <= SHINGLE:
        return {text}
    return {text[i : i + SHINGLE] for i in range(len(text) - SHINGLE + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _minhash(items: set[str]) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([s.encode("utf-8") for s in items])
    return m


def _exact_groups(lines: list[int], texts: list[str]) -> list[list[int]]:
    by_text: dict[str, list[int]] = {}
    for line, text in zip(lines, texts):
        by_text.setdefault(normalise(text), []).append(line)
    return [group for group in by_text.values() if len(group) > 1]


def find_duplicates(lines: list[int], texts: list[str], threshold: float = 0.8) -> dict:
    """{"exact": [[line, ...], ...] (same normalised text), "near": [[line_a, line_b, jaccard], ...]}."""
    exact = _exact_groups(lines, texts)
    sets = [shingles(t) for t in texts]
    lsh = MinHashLSH(threshold=max(0.05, threshold - CANDIDATE_MARGIN), num_perm=NUM_PERM)
    near = []
    seen_text: dict[str, int] = {}
    for i, items in enumerate(sets):
        key = normalise(texts[i])
        if key in seen_text:  # an exact copy is reported once, as exact
            continue
        seen_text[key] = i
        m = _minhash(items)
        for j in lsh.query(m):
            score = jaccard(items, sets[j])
            if score >= threshold:
                near.append([lines[j], lines[i], round(score, 3)])
        lsh.insert(i, m)
    near.sort()
    return {"exact": exact, "near": near}


def find_leaks(
    train_lines: list[int], train_texts: list[str], eval_lines: list[int], eval_texts: list[str], threshold: float = 0.8
) -> list[dict]:
    """Evaluation records that (nearly) repeat a training record: [{eval_line, train_line, jaccard}]."""
    train_sets = [shingles(t) for t in train_texts]
    lsh = MinHashLSH(threshold=max(0.05, threshold - CANDIDATE_MARGIN), num_perm=NUM_PERM)
    for i, items in enumerate(train_sets):
        lsh.insert(i, _minhash(items))
    leaks = []
    for line, text in zip(eval_lines, eval_texts):
        items = shingles(text)
        matches = sorted(((jaccard(items, train_sets[j]), j) for j in lsh.query(_minhash(items))), reverse=True)
        if matches and matches[0][0] >= threshold:
            score, j = matches[0]
            leaks.append({"eval_line": line, "train_line": train_lines[j], "jaccard": round(score, 3)})
    return leaks
