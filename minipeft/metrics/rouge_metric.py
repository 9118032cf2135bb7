"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum (Lin, 2004) F1/precision/recall, equal to Google's rouge-score.

Per (hypothesis h, reference r) pair, on token lists:

    ROUGE-N: overlap = sum_g min(count_h(g), count_r(g)) over n-grams g;
             P = overlap / max(|ngrams(h)|, 1),  R = overlap / max(|ngrams(r)|, 1)
    ROUGE-L: P = LCS(h, r) / |h|,  R = LCS(h, r) / |r|   (all 0 if either side is empty)
    ROUGE-Lsum, summary-level LCS (Lin's section 3.2): h and r are split into sentences h_1..h_k and
             r_1..r_l at each "\n" (rouge-score's rule: only "\n" splits, and a line without tokens
             changes nothing). For each r_i, U_i = the positions of r_i in LCS(r_i, h_1), ..., or
             LCS(r_i, h_k) (the union LCS). A token w that occurs u_w times at these positions (all
             i) counts min(u_w, count_h(w)) hits, so no hypothesis token is matched twice (ROUGE
             1.5.5's rule, also bounded by count_r(w), which u_w never exceeds);
             P = hits / |h|,  R = hits / |r|   (|h|, |r| count the tokens of all lines).
    F1 = 2PR / (P + R)  (0 when P + R = 0)

Which LCS gives U_i matters when several exist (r = "a b", h = "b a"): rouge-score's, the one found
walking back from the ends of both sequences, matching equal last tokens and otherwise dropping
r's last token whenever that keeps the LCS length, else h's. With one line on each side
ROUGE-Lsum equals ROUGE-L. rouge-score's split_summaries option (sentences found by nltk's punkt
model instead of lines) is not offered: put each sentence on its own line first, as Hugging Face's
summarization examples do.

With several references the one with the best F1 is kept, per ROUGE type (rouge-score's
score_multi). Corpus scores are the mean over pairs of the per-pair P, R and F1, which is what
rouge-score users compute. Scores are in [0, 1] (BLEU, following sacrebleu, is 0-100).

Tokenization. lang="en" is rouge-score's default tokenizer: lowercase, then every maximal run of
[a-z0-9] is a token; everything else, including all non-ASCII text, is dropped. lang="zh": Chinese
has no spaces between words, and rouge-score's tokenizer would drop every Chinese character,
leaving empty token lists and scores of 0. So each non-ASCII letter or digit (str.isalnum: Chinese
characters, kana, ...) is its own token, ASCII [a-z0-9] runs stay whole words (so "LoRA" in a
Chinese sentence is one token), and punctuation is dropped as in English. lang="intl", for the
scripts written with spaces that rouge-score would also drop (Cyrillic, Greek, Hangul, Arabic,
...): every maximal run of letters and digits of any script is a word, lowercased, but for Chinese
characters and kana, one token each as in "zh". Scripts written without spaces other than those
(Thai, ...) are not segmented. No token spans a "\n" in any mode, so a text's tokens are its
lines' tokens end to end.
use_stemmer=True is rouge-score's: every token longer than 3 characters is replaced by its Porter
stem (metrics.porter, equal to NLTK's), so "models" and "model" match. The Porter rules are for
English: in "zh" and "intl" only ASCII words are stemmed.
tests/test_metrics.py and tests/test_rouge.py check parity with rouge_score.rouge_scorer.RougeScorer.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterator, NamedTuple

from ._inputs import References, as_reference_lists
from .porter import porter_stem

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
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


def rouge_tokenize(text: str, lang: str = "en", use_stemmer: bool = False) -> list[str]:
    """The tokens ROUGE compares (see the module docstring for the rules of each language)."""
    if lang not in _TOKEN_PATTERNS:
        raise ValueError(f"rouge: lang={lang!r}, expected one of {sorted(_TOKEN_PATTERNS)}")
    tokens = _TOKEN_PATTERNS[lang].findall(text.lower())
    if use_stemmer:
        tokens = [porter_stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]
    return tokens


def _from_overlap(overlap: int, hyp_count: int, ref_count: int) -> RougeScore:
    precision, recall = overlap / max(hyp_count, 1), overlap / max(ref_count, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return RougeScore(precision, recall, f1)


def _rouge_n(hyp: list[str], ref: list[str], n: int) -> RougeScore:
    hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
    ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((hyp_grams & ref_grams).values())
    return _from_overlap(overlap, sum(hyp_grams.values()), sum(ref_grams.values()))


def _lcs_rows(a: list[str], b: list[str]) -> Iterator[list[int]]:
    """The LCS table by dynamic programming, row by row: row i holds LCS(a[:i], b[:j]) for j = 0..|b|."""
    row = [0] * (len(b) + 1)
    yield row
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        yield row


def _lcs_length(a: list[str], b: list[str]) -> int:
    for row in _lcs_rows(a, b):  # keeps one row at a time
        pass
    return row[-1]


def _lcs_positions(ref: list[str], hyp: list[str]) -> set[int]:
    """Positions in ref of the LCS of ref and hyp that rouge-score picks (module docstring)."""
    table = list(_lcs_rows(ref, hyp))
    i, j, positions = len(ref), len(hyp), set()
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            i, j = i - 1, j - 1
            positions.add(i)
        elif table[i - 1][j] == table[i][j]:
            i -= 1
        else:
            j -= 1
    return positions


def _rouge_l(hyp: list[str], ref: list[str]) -> RougeScore:
    return _from_overlap(_lcs_length(hyp, ref), len(hyp), len(ref))  # an empty side: LCS 0, all scores 0


def _rouge_lsum(hyp_lines: list[list[str]], ref_lines: list[list[str]]) -> RougeScore:
    union = Counter()  # u_w
    for ref in ref_lines:
        positions = set().union(*(_lcs_positions(ref, hyp) for hyp in hyp_lines))
        union.update(ref[i] for i in positions)
    hyp_counts = Counter(t for line in hyp_lines for t in line)
    hits = sum((union & hyp_counts).values())
    return _from_overlap(hits, sum(hyp_counts.values()), sum(map(len, ref_lines)))


def _lines(text: str, lang: str, use_stemmer: bool) -> list[list[str]]:
    """The tokens of each line; end to end, they are the text's tokens (no token spans a "\n")."""
    return [rouge_tokenize(line, lang, use_stemmer) for line in text.split("\n")]


def _pair_scores(hyp_lines: list[list[str]], ref_lines: list[list[str]]) -> dict[str, RougeScore]:
    hyp = [t for line in hyp_lines for t in line]
    ref = [t for line in ref_lines for t in line]
    return {"rouge1": _rouge_n(hyp, ref, 1), "rouge2": _rouge_n(hyp, ref, 2), "rougeL": _rouge_l(hyp, ref),
            "rougeLsum": _rouge_lsum(hyp_lines, ref_lines)}


def rouge_pair(hypothesis: str, references: str | list[str], lang: str = "en",
               use_stemmer: bool = False) -> dict[str, RougeScore]:
    """ROUGE of one hypothesis; with several references, the best-F1 reference per type."""
    refs = as_reference_lists([hypothesis], [references], "rouge_pair")[0]
    hyp_lines = _lines(hypothesis, lang, use_stemmer)
    per_ref = [_pair_scores(hyp_lines, _lines(ref, lang, use_stemmer)) for ref in refs]
    # max() keeps the first of equal F1s, like rouge-score's np.argmax.
    return {t: max((s[t] for s in per_ref), key=lambda s: s.fmeasure) for t in ROUGE_TYPES}


def rouge(hypotheses: list[str], references: References, lang: str = "en",
          use_stemmer: bool = False) -> dict[str, float]:
    """Corpus ROUGE: mean over pairs of per-pair scores, in [0, 1].

    references[i] is the reference string of hypotheses[i] or a list of its references.
    Returns {"rouge1": F1, "rouge1_precision": P, "rouge1_recall": R, ...} for rouge1, rouge2, rougeL
    and rougeLsum. use_stemmer=True compares Porter stems, as rouge-score's option of that name.
    """
    ref_lists = as_reference_lists(hypotheses, references, "rouge")
    sums = {f"{t}{suffix}": 0.0 for t in ROUGE_TYPES for suffix in ("", "_precision", "_recall")}
    for hyp, refs in zip(hypotheses, ref_lists):
        for t, s in rouge_pair(hyp, refs, lang, use_stemmer).items():
            sums[t] += s.fmeasure
            sums[f"{t}_precision"] += s.precision
            sums[f"{t}_recall"] += s.recall
    return {key: total / len(hypotheses) for key, total in sums.items()}
