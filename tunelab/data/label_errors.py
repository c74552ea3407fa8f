"""Likely label errors in classification data by confident learning (cleanlab) on out-of-fold probabilities.

Every record's class probabilities come from a model that did not see it (k-fold cross_val_predict), so a
record the rest of the data contradicts stands out. The default model is cheap: TF-IDF on character n-grams
(works for Chinese without a word segmenter) + logistic regression. With `features`, another representation
(e.g. a real model's embeddings) replaces TF-IDF.
"""

from __future__ import annotations

import numpy as np


def out_of_fold_probs(texts: list[str], labels: np.ndarray, n_classes: int, seed: int = 0, features=None):
    """(n, n_classes) probabilities, each row from a model trained on the other folds."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    smallest = int(np.bincount(labels, minlength=n_classes).min())
    folds = StratifiedKFold(n_splits=max(2, min(5, smallest)), shuffle=True, random_state=seed)
    classifier = LogisticRegression(max_iter=2000, C=4.0)
    if features is None:
        model = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True), classifier)
        x = list(texts)
    else:
        model, x = classifier, features
    return cross_val_predict(model, x, labels, cv=folds, method="predict_proba")


def rank_label_issues(texts: list[str], labels: list[str], seed: int = 0, features=None) -> dict:
    """{"flagged": [{index, label, suggested, quality}], "ranking": all indices, lowest label quality first}.

    `flagged` holds what cleanlab's find_label_issues calls issues, ranked by self-confidence."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    names = sorted(set(labels))
    if len(names) < 2:
        return {"flagged": [], "ranking": [], "classes": names}
    y = np.array([names.index(label) for label in labels])
    counts = np.bincount(y, minlength=len(names))
    if counts.min() < 2:  # a class with one record cannot be cross-validated
        return {"flagged": [], "ranking": [], "classes": names, "skipped": "a class has fewer than 2 records"}
    probs = out_of_fold_probs(texts, y, len(names), seed, features)
    quality = get_label_quality_scores(y, probs)
    issues = find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    flagged = [
        {
            "index": int(i),
            "label": names[y[i]],
            "suggested": names[int(probs[i].argmax())],
            "quality": round(float(quality[i]), 4),
        }
        for i in issues
    ]
    return {"flagged": flagged, "ranking": [int(i) for i in np.argsort(quality, kind="stable")], "classes": names}


def model_embeddings(name: str, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled last hidden states of model `name` (frozen, no head): `data check --model M` features."""
    import torch

    from ..models import load_classifier, load_tokenizer

    tokenizer = load_tokenizer(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_classifier(name, ["a", "b"], pad_token_id=tokenizer.pad_token_id).eval()
    body = model.base_model
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).float().numpy())
    return np.concatenate(out)
