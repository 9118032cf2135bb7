"""ROUGE-1, ROUGE-2 and ROUGE-L (Lin, 2004) F1/precision/recall, equal to Google's rouge-score.

Per (hypothesis h, reference r) pair, on token lists:

    ROUGE-N: overlap = sum_g min(count_h(g), count_r(g)) over n-grams g;
             P = overlap / max(|ngrams(h)|, 1),  R = overlap / max(|ngrams(r)|, 1)
    ROUGE-L: P = LCS(h, r) / |h|,  R = LCS(h, r) / |r|   (all 0 if either side is empty)
    F1 = 2PR / (P + R)  (0 when P + R = 0)

With several references the one with the best F1 is kept, per ROUGE type (rouge-score's
score_multi). Corpus scores are the mean over pairs of the per-pair P, R and F1, which is what
rouge-score users compute. Scores are in [0, 1] (BLEU, following sacrebleu, is 0-100).

Tokenization. lang="en" is rouge-score's default tokenizer without stemming: lowercase, then
every maximal run of [a-z0-9] is a token; everything else, including all non-ASCII text, is
dropped. lang="zh": Chinese has no spaces between words, and rouge-score's tokenizer would
drop every Chinese character, leaving empty token lists and scores of 0. So each non-ASCII
letter or digit (str.isalnum: Chinese characters, kana, ...) is its own token, ASCII [a-z0-9]
runs stay whole words (so "LoRA" in a Chinese sentence is one token), and punctuation is dropped
as in English. lang="intl", for the scripts written with spaces that rouge-score would also drop
(Cyrillic, Greek, Hangul, Arabic, ...): every maximal run of letters and digits of any script is
a word, lowercased, but for Chinese characters and kana, one token each as in "zh". Scripts
written without spaces other than those (Thai, ...) are not segmented. No stemming option is
offered: matching NLTK's Porter stemmer exactly is out of scope.
tests/test_metrics.py checks parity with rouge_score.rouge_scorer.RougeScorer.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

from ._inputs import References, as_reference_lists

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and CJK ideographs
_TOKEN_PATTERNS = {
    "en": re.compile(r"[a-z0-9]+"),
    "zh": re.compile(r"[a-z0-9]+|[^\W_]"),  # [^\W_] is one str.isalnum() character
    "intl": re.compile(rf"[{CJK}]|[^\W_{CJK}]+"),
}


class RougeScore(NamedTuple):
    """One ROUGE type for one pair (or a corpus mean): same fields as rouge_score.scoring.Score."""

    precision: float
    recall: float
    fmeasure: float


def rouge_tokenize(text: str, lang: str = "en") -> list[str]:
    """The tokens ROUGE compares (see the module docstring for the rules of each language)."""
    if lang not in _TOKEN_PATTERNS:
        raise ValueError(f"rouge: lang={lang!r}, expected one of {sorted(_TOKEN_PATTERNS)}")
    return _TOKEN_PATTERNS[lang].findall(text.lower())


def _from_overlap(overlap: int, hyp_count: int, ref_count: int) -> RougeScore:
    precision, recall = overlap / max(hyp_count, 1), overlap / max(ref_count, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return RougeScore(precision, recall, f1)


def _rouge_n(hyp: list[str], ref: list[str], n: int) -> RougeScore:
    hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
    ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((hyp_grams & ref_grams).values())
    return _from_overlap(overlap, sum(hyp_grams.values()), sum(ref_grams.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length by dynamic programming, one row of the table at a time."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def _rouge_l(hyp: list[str], ref: list[str]) -> RougeScore:
    if not hyp or not ref:
        return RougeScore(0.0, 0.0, 0.0)
    return _from_overlap(_lcs_length(hyp, ref), len(hyp), len(ref))


def _pair_scores(hyp: list[str], ref: list[str]) -> dict[str, RougeScore]:
    return {"rouge1": _rouge_n(hyp, ref, 1), "rouge2": _rouge_n(hyp, ref, 2), "rougeL": _rouge_l(hyp, ref)}


def rouge_pair(hypothesis: str, references: str | list[str], lang: str = "en") -> dict[str, RougeScore]:
    """ROUGE of one hypothesis; with several references, the best-F1 reference per type."""
    refs = as_reference_lists([hypothesis], [references], "rouge_pair")[0]
    hyp = rouge_tokenize(hypothesis, lang)
    per_ref = [_pair_scores(hyp, rouge_tokenize(ref, lang)) for ref in refs]
    # max() keeps the first of equal F1s, like rouge-score's np.argmax.
    return {t: max((s[t] for s in per_ref), key=lambda s: s.fmeasure) for t in ROUGE_TYPES}


def rouge(hypotheses: list[str], references: References, lang: str = "en") -> dict[str, float]:
    """Corpus ROUGE: mean over pairs of per-pair scores, in [0, 1].

    references[i] is the reference string of hypotheses[i] or a list of its references.
    Returns {"rouge1": F1, "rouge1_precision": P, "rouge1_recall": R, ...} for rouge1, rouge2, rougeL.
    """
    ref_lists = as_reference_lists(hypotheses, references, "rouge")
    sums = {f"{t}{suffix}": 0.0 for t in ROUGE_TYPES for suffix in ("", "_precision", "_recall")}
    for hyp, refs in zip(hypotheses, ref_lists):
        for t, s in rouge_pair(hyp, refs, lang).items():
            sums[t] += s.fmeasure
            sums[f"{t}_precision"] += s.precision
            sums[f"{t}_recall"] += s.recall
    return {key: total / len(hypotheses) for key, total in sums.items()}
