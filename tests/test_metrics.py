"""tunelab.eval.metrics against the reference libraries (sklearn, sacrebleu, rouge-score) or by hand."""

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from tunelab.errors import UserError
from tunelab.eval.metrics import (
    CJKCharTokenizer,
    bleu,
    bleu_omission_reason,
    classification_metrics,
    exact_match,
    generation_metrics,
    latency_stats,
    normalize_answer,
    rouge,
)

LABELS3 = ["cat", "dog", "bird"]
Y_TRUE3 = [0, 0, 1, 1, 2, 2, 2]
Y_PRED3 = [0, 1, 1, 1, 2, 0, 2]
PROBS3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.6, 0.2],
        [0.1, 0.2, 0.7],
        [0.5, 0.1, 0.4],
        [0.2, 0.2, 0.6],
    ]
)


def test_three_class_metrics_match_sklearn_and_hand_counts():
    m = classification_metrics(Y_TRUE3, Y_PRED3, PROBS3, LABELS3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    for average in ("macro", "weighted"):
        kw = dict(average=average, zero_division=0)
        assert m[f"precision_{average}"] == pytest.approx(precision_score(Y_TRUE3, Y_PRED3, **kw))
        assert m[f"recall_{average}"] == pytest.approx(recall_score(Y_TRUE3, Y_PRED3, **kw))
        assert m[f"f1_{average}"] == pytest.approx(f1_score(Y_TRUE3, Y_PRED3, **kw))
    # By hand: cat P=1/2 R=1/2, dog P=2/3 R=1, bird P=1 R=2/3.
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["per_class"]["dog"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["bird"]["support"] == 3
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    ref_auc = roc_auc_score(Y_TRUE3, PROBS3, multi_class="ovr", labels=range(3))
    assert m["roc_auc"] == pytest.approx(ref_auc)
    assert m["warnings"] == []


def test_binary_auc_uses_positive_class_column():
    y_true = [0, 0, 1, 1, 1]
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4]])
    m = classification_metrics(y_true, [0, 1, 1, 1, 0], probs, ["neg", "pos"])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y_true, probs[:, 1]))
    # By hand: positives 0.6, 0.8, 0.4 vs negatives 0.1, 0.7 -> 4 of 6 pairs ranked right.
    assert m["roc_auc"] == pytest.approx(4 / 6)


def test_label_absent_from_data_still_gets_a_row_and_column():
    labels = ["a", "b", "c"]
    m = classification_metrics([0, 1, 0, 1], [0, 1, 1, 1], None, labels)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    ref = f1_score([0, 1, 0, 1], [0, 1, 1, 1], average="macro", labels=[0, 1, 2], zero_division=0)
    assert m["f1_macro"] == pytest.approx(ref)
    assert "roc_auc" not in m


def test_auc_with_a_single_true_class_is_none_with_a_warning():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics([0, 0, 0], [0, 1, 0], probs, ["neg", "pos"])
    assert m["roc_auc"] is None
    assert len(m["warnings"]) == 1 and "only one class" in m["warnings"][0]


def test_an_evaluation_missing_a_class_says_why_it_has_no_auc():
    # eval.json had no eval_auc and nothing said why (the validation split had drawn no example of a class)
    from types import SimpleNamespace

    from tunelab.eval.loss import _classification_scores

    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "中性", 1: "负面", 2: "正面"}))
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2]])
    scores = _classification_scores(model, [0, 1, 0], [0, 1, 0], probs)
    assert "eval_auc" not in scores
    assert scores["eval_classification_warnings"] == ["ROC AUC is undefined: no true example of 正面"]


def test_empty_classification_input_is_a_user_error():
    with pytest.raises(UserError, match="the evaluation set is empty"):
        classification_metrics([], [], None, ["a", "b"])


def test_exact_match_normalises_whitespace():
    preds = ["  Paris ", "New   York", "london"]
    refs = ["Paris", "New York", "London"]
    assert exact_match(preds, refs) == pytest.approx(2 / 3)
    assert exact_match(preds, refs, normalize=False) == 0.0
    assert normalize_answer(" New \t York\n") == "New York"
    # the mean of one-pair calls (predictions.jsonl rows) is the aggregate
    assert np.mean([exact_match([p], [r]) for p, r in zip(preds, refs)]) == pytest.approx(exact_match(preds, refs))


EN_PREDS = ["the cat sat on the mat", "a quick brown fox jumps over the dog"]
EN_REFS = ["the cat is sitting on the mat", "the quick brown fox jumps over the lazy dog"]
ZH_PREDS = ["今天天气很好，我们去公园散步", "他喜欢读书和写字"]
ZH_REFS = ["今天天气不错，我们去公园散步吧", "他非常喜欢读书"]


def test_bleu_english_matches_sacrebleu():
    # on the 0-1 scale of every other score: sacrebleu's 0-100 divided by 100
    assert bleu(EN_PREDS, EN_REFS) == pytest.approx(sacrebleu.corpus_bleu(EN_PREDS, [EN_REFS]).score / 100)


@pytest.mark.parametrize("lang", ["zh", "auto"])
def test_bleu_chinese_uses_the_zh_tokenizer(lang):
    zh_ref = sacrebleu.corpus_bleu(ZH_PREDS, [ZH_REFS], tokenize="zh").score
    default_ref = sacrebleu.corpus_bleu(ZH_PREDS, [ZH_REFS], tokenize="13a").score
    assert zh_ref != pytest.approx(default_ref)  # otherwise this test could not tell the paths apart
    assert bleu(ZH_PREDS, ZH_REFS, lang=lang) == pytest.approx(zh_ref / 100)


def test_rouge_english_matches_rouge_scorer_without_stemming():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    per_example = [scorer.score(r, p) for p, r in zip(EN_PREDS, EN_REFS)]
    got = rouge(EN_PREDS, EN_REFS, lang="en")
    for name in ("rouge1", "rouge2", "rougeL"):
        assert got[name] == pytest.approx(np.mean([s[name].fmeasure for s in per_example]))
    assert rouge(EN_PREDS, EN_REFS) == got  # 'auto' sees no CJK and keeps the default tokenizer


def test_rouge_chinese_counts_characters():
    # 3 of 4 characters shared: P = R = 3/4, so F1 = 0.75.
    pred, ref = "我爱北京", "我爱北海"
    assert rouge([pred], [ref])["rouge1"] == pytest.approx(0.75)
    assert rouge([pred], [ref], lang="zh")["rouge1"] == pytest.approx(0.75)
    default = rouge_scorer.RougeScorer(["rouge1"]).score(ref, pred)["rouge1"].fmeasure
    assert default == 0.0  # rouge-score's own tokenizer drops every Chinese character


def test_a_mixed_chinese_english_set_scores_its_chinese_answers_by_character():
    # The README's example file mixes the two. With 13a (chosen while most references were English) a wrong
    # Chinese answer was one wrong token among the English ones: BLEU 0.955 for one right answer of two. With
    # rouge-score's own tokenizer a right Chinese answer scored 0.
    preds, refs = ["晨赌穴走近！", "She walked to school."], ["早上好。", "She walked to school."]
    zh = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score / 100
    assert zh != pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="13a").score / 100)
    assert generation_metrics(preds, refs)["bleu"] == pytest.approx(zh)  # eval.lang's default: auto
    assert bleu(preds, refs, lang="en") != pytest.approx(zh)  # told English: 13a, as asked
    right = rouge(["早上好。", "She walks."], ["早上好。", "She walked to school."])
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    english = scorer.score("She walked to school.", "She walks.")["rouge1"].fmeasure
    assert right["rouge1"] == pytest.approx((1.0 + english) / 2)


def test_the_cjk_tokenizer_is_rouge_scores_own_on_other_text():
    from rouge_score import tokenize

    texts = EN_REFS + EN_PREDS + ["Hello, World! It's 3.5 km (approx.)", "naïve café — e.g. U.S.A.; x=y&z", ""]
    for text in texts:
        assert CJKCharTokenizer().tokenize(text) == tokenize.tokenize(text, None)


def test_rouge_cjk_tokenizer_keeps_latin_words():
    got = rouge(["我用 Python 写代码"], ["我用 python 写程序"], lang="zh")
    # Tokens: 我 用 python 写 代 码 vs 我 用 python 写 程 序 -> 4 of 6 shared.
    assert got["rouge1"] == pytest.approx(4 / 6)


def test_empty_predictions_score_zero_and_are_counted():
    m = generation_metrics(["", "   "], ["the cat sat on the mat", "by the door of the house"])
    assert m["empty_predictions"] == 2
    assert m["exact_match"] == 0.0 and m["bleu"] == 0.0
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == 0.0
    assert len(m["warnings"]) == 1 and "2 of 2" in m["warnings"][0]


def test_generation_metrics_mix_empty_and_real_predictions():
    preds, refs = ["the cat sat on the mat", ""], ["the cat sat on the mat", "hello world"]
    m = generation_metrics(preds, refs)
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["rouge1"] == pytest.approx(0.5)  # 1.0 and 0.0 averaged
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert m["empty_predictions"] == 1 and len(m["warnings"]) == 1
    clean = generation_metrics(["hello world"], ["hello world"])
    assert clean["empty_predictions"] == 0 and clean["warnings"] == []


def test_perfect_answers_score_one_on_every_metric():
    m = generation_metrics(EN_REFS, EN_REFS)
    for name in ("exact_match", "bleu", "rouge1", "rouge2", "rougeL"):
        assert m[name] == pytest.approx(1.0), name
    assert m["notes"] == []


def test_bleu_is_omitted_with_a_note_when_most_references_are_short():
    preds, refs = ["red", "green blue", "the cat sat on the mat"], ["red", "green", "the cat sat on the mat"]
    m = generation_metrics(preds, refs)
    assert "bleu" not in m and m["exact_match"] == pytest.approx(2 / 3)
    assert len(m["notes"]) == 1 and "BLEU omitted: 2 of 3 references have fewer than 4 tokens" in m["notes"][0]
    # sacrebleu's own tokenization counts: "a, b!" is 4 tokens (a , b !), so not short
    assert bleu_omission_reason(["a, b!", "x"]) is None  # 1 of 2 short is not most
    assert bleu_omission_reason(["a b", "x"]) is not None
    # Chinese counts characters (the zh tokenizer): 红色 is 2 tokens, 今天天气很好 is 6
    assert bleu_omission_reason(["红色", "蓝色", "今天天气很好"], lang="auto") is not None
    assert bleu_omission_reason(["今天天气很好", "他喜欢读书"], lang="auto") is None


def test_generation_metrics_reject_empty_or_unpaired_input():
    with pytest.raises(UserError, match="the evaluation set is empty"):
        generation_metrics([], [])
    with pytest.raises(UserError, match="pair one to one"):
        generation_metrics(["a"], ["a", "b"])


def test_latency_stats_match_numpy_percentiles():
    seconds = [0.010, 0.020, 0.015, 0.200, 0.012, 0.018, 0.011, 0.013, 0.050, 0.016]
    s = latency_stats(seconds)
    ms = np.array(seconds) * 1000
    assert s["p50_ms"] == pytest.approx(np.percentile(ms, 50))
    assert s["p95_ms"] == pytest.approx(np.percentile(ms, 95))
    assert s["mean_ms"] == pytest.approx(36.5)
    assert s["throughput"] == pytest.approx(10 / 0.365)
