"""Evaluation metrics as pure functions over lists / numpy arrays: classification (sklearn),
generation (exact match, sacrebleu BLEU, rouge-score ROUGE) and latency. No model code here.

Every score is a fraction in [0, 1] (BLEU included, unlike sacrebleu's 0-100), so they compare directly."""

from __future__ import annotations

import re
import warnings as _warnings

import numpy as np

from ..errors import UserError

# Han ideographs (incl. extension A and compatibility), kana and Hangul syllables: scripts written
# without spaces, so word-based tokenizers either drop them or see a whole sentence as one token.
_CJK_CHAR = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_RE = re.compile(f"[{_CJK_CHAR}]")
# One CJK character, or a run of latin letters / digits (rouge-score's default keeps only [a-z0-9]).
_CJK_TOKEN_RE = re.compile(f"[{_CJK_CHAR}]|[a-z0-9]+")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities fall as a model improves; every other metric here (a fraction) rises."""
    return metric.endswith("loss") or metric.endswith("ppl")


def _require_nonempty_pairs(first: list, second: list, first_name: str, second_name: str) -> None:
    if len(first) == 0:
        raise UserError("the evaluation set is empty")
    if len(first) != len(second):
        raise UserError(f"{len(first)} {first_name} but {len(second)} {second_name}; they must pair one to one")


# --- classification -------------------------------------------------------------------------------


def classification_metrics(y_true: list[int], y_pred: list[int], probs: np.ndarray | None, labels: list[str]) -> dict:
    """Accuracy, macro / weighted precision-recall-F1, a per-class report, the confusion matrix and
    ROC AUC (when `probs` is given), all as fractions in [0, 1] except supports (example counts).

    y_true / y_pred are class indices into `labels`; probs is (n_examples, n_labels) class
    probabilities (rows summing to 1), or for two labels also a 1-d array of positive-class
    probabilities. The confusion matrix is a nested list over every label, rows = true,
    columns = predicted. `roc_auc` is None, with an entry in `warnings`, when it is undefined.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    _require_nonempty_pairs(y_true, y_pred, "true labels", "predictions")
    label_ids = list(range(len(labels)))
    # Passing every label id keeps classes absent from this split in the report and the matrix.
    common = dict(labels=label_ids, zero_division=0)
    result: dict = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, **common)
        result.update({f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)})
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, **common)
    result["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, name in enumerate(labels)
    }
    result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=label_ids).tolist()
    result["warnings"] = []
    if probs is not None:
        result["roc_auc"] = _roc_auc(y_true, np.asarray(probs, dtype=float), labels, result["warnings"])
    return result


def _roc_auc(y_true: list[int], probs: np.ndarray, labels: list[str], warnings: list[str]) -> float | None:
    """Binary AUC from the positive-class column, else one-vs-rest macro AUC; None when undefined."""
    from sklearn.metrics import roc_auc_score

    n_labels = len(labels)
    present = sorted(set(int(y) for y in y_true))
    if len(present) < 2:
        warnings.append(f"ROC AUC is undefined: only one class ({labels[present[0]]}) is present in the true labels")
        return None
    if n_labels > 2 and len(present) < n_labels:
        # One-vs-rest needs positives for every class; sklearn would return NaN here.
        absent = ", ".join(labels[i] for i in range(n_labels) if i not in present)
        warnings.append(f"ROC AUC is undefined: no true example of {absent}")
        return None
    scores = probs[:, 1] if n_labels == 2 and probs.ndim == 2 else probs
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")  # sklearn's own warning becomes ours below
            auc = roc_auc_score(y_true, scores, multi_class="ovr", labels=list(range(n_labels)))
    except ValueError as err:  # e.g. probabilities whose rows do not sum to 1
        warnings.append(f"ROC AUC could not be computed: {err}")
        return None
    if np.isnan(auc):
        warnings.append("ROC AUC is undefined for these labels")
        return None
    return float(auc)


# --- generation -----------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The one normalisation exact match uses everywhere (aggregate, per-row, demo): leading and trailing
    whitespace stripped, inner runs of whitespace collapsed to one space; case and punctuation kept."""
    return " ".join(text.split())


def _any_cjk(references: list[str]) -> bool:
    """True when any reference contains a CJK character: in a mixed Chinese-English set, 13a would read each
    Chinese answer as one word (a wrong one costs one token of the corpus, a right one earns one)."""
    return any(_CJK_RE.search(ref) for ref in references)


def exact_match(predictions: list[str], references: list[str], normalize: bool = True) -> float:
    """Fraction in [0, 1] of predictions equal to their reference; with `normalize`, both sides go
    through `normalize_answer` first."""
    _require_nonempty_pairs(predictions, references, "predictions", "references")
    if normalize:
        predictions = [normalize_answer(p) for p in predictions]
        references = [normalize_answer(r) for r in references]
    return sum(p == r for p, r in zip(predictions, references)) / len(predictions)


def _bleu_tokenize(lang: str, references: list[str]) -> str:
    # 13a keeps a run of Chinese characters as one token, so BLEU on it is near zero even for good output;
    # sacrebleu's zh splits Chinese characters and tokenizes everything else as 13a does
    return "zh" if lang.lower().startswith("zh") or (lang == "auto" and _any_cjk(references)) else "13a"


def bleu(predictions: list[str], references: list[str], lang: str = "en") -> float:
    """Corpus BLEU as a fraction in [0, 1] (sacrebleu's 0-100 score / 100), one reference per
    prediction. Chinese (`lang` 'zh...', or 'auto' with any CJK reference) uses sacrebleu's 'zh'
    tokenizer, otherwise '13a'."""
    import sacrebleu

    _require_nonempty_pairs(predictions, references, "predictions", "references")
    tokenize = _bleu_tokenize(lang, references)
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score) / 100.0


def bleu_omission_reason(references: list[str], lang: str = "en") -> str | None:
    """Why BLEU would be meaningless here, or None. BLEU is a geometric mean of 1- to 4-gram precisions:
    when most references have fewer than 4 tokens (sacrebleu's tokenization), its higher orders rest
    on the few long examples or on nothing, so the number says little about the answers."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(tokenize=_bleu_tokenize(lang, references))
    order = scorer.max_ngram_order
    short = sum(1 for ref in references if len(scorer.tokenizer(ref.strip()).split()) < order)
    if short * 2 <= len(references):
        return None
    return (
        f"BLEU omitted: {short} of {len(references)} references have fewer than {order} tokens, "
        f"too short for its {order}-gram precision; exact match and ROUGE still apply"
    )


class CJKCharTokenizer:
    """rouge-score tokenizer: each CJK character is a token, latin words / numbers stay whole
    (lowercased, like rouge-score's default, which instead drops every non-[a-z0-9] character)."""

    def tokenize(self, text: str) -> list[str]:
        return _CJK_TOKEN_RE.findall(text.lower())


def rouge(predictions: list[str], references: list[str], lang: str = "auto") -> dict:
    """Mean over examples of the ROUGE-1/2/L F-measures, each in [0, 1] (no stemming). CJK characters are
    tokens each, whatever `lang` says: `CJKCharTokenizer` tokenizes other text as rouge-score's default does,
    which would drop them (a mixed Chinese-English set scored its Chinese answers 0, right or wrong)."""
    from rouge_score import rouge_scorer

    _require_nonempty_pairs(predictions, references, "predictions", "references")
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=False, tokenizer=CJKCharTokenizer())
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        # rouge-score takes (target, prediction); an empty prediction scores 0 rather than failing.
        scores = scorer.score(reference, prediction)
        for name in _ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def generation_metrics(predictions: list[str], references: list[str], lang: str = "auto") -> dict:
    """{exact_match, bleu, rouge1, rouge2, rougeL}, all fractions in [0, 1], and `empty_predictions`
    (count of blank predictions). `bleu` is left out when most references are too short for it, with
    the reason in `notes`; `warnings` explains any empty predictions."""
    _require_nonempty_pairs(predictions, references, "predictions", "references")
    empty = sum(1 for p in predictions if not p.strip())
    result: dict = {"exact_match": exact_match(predictions, references)}
    result["notes"] = []
    if reason := bleu_omission_reason(references, lang):
        result["notes"].append(reason)
    else:
        result["bleu"] = bleu(predictions, references, lang=lang)
    result.update(rouge(predictions, references, lang=lang))
    result["empty_predictions"] = empty
    result["warnings"] = []
    if empty:
        # Usually a sign of a generation problem (EOS first, too few new tokens), not of the model's skill.
        result["warnings"].append(f"{empty} of {len(predictions)} predictions are empty; they score 0 on every metric")
    return result


# --- latency --------------------------------------------------------------------------------------


def latency_stats(seconds: list[float]) -> dict:
    """Per-example latencies in seconds -> {p50_ms, p95_ms, mean_ms} in milliseconds and
    `throughput` in examples per second (count / total seconds, None if the total is 0)."""
    if len(seconds) == 0:
        raise UserError("no latencies to summarise: the evaluation set is empty")
    ms = np.asarray(seconds, dtype=float) * 1000.0
    total_seconds = float(np.sum(seconds))
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "throughput": len(seconds) / total_seconds if total_seconds > 0 else None,
    }
