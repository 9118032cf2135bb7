"""Corpus BLEU-4 (Papineni et al., 2002) with sacrebleu's tokenizers, smoothing and defaults.

For a corpus of hypotheses h_i with reference sets R_i, after tokenization:

    m_n = sum_i sum_{g in ngrams_n(h_i)} min(count_{h_i}(g), max_{r in R_i} count_r(g))   (clipped matches)
    t_n = sum_i |ngrams_n(h_i)|                                                         (n = 1..4)
    c   = sum_i |h_i|,   r = sum_i |closest r in R_i to |h_i||  (ties -> shorter reference)
    BP  = 1 if c >= r else exp(1 - r / c)   (0 when c == 0)
    BLEU = 100 * BP * exp(mean_n log(m_n / t_n))

Tokenizers, re-implemented from the mteval-v13a rules: "13a" (WMT default), "zh" (CJK characters
split, the rest 13a-split) and "char" (every non-space character); "intl" from mteval-v14's
international rules: every Unicode punctuation mark split off unless a digit sits on both sides
("1,000", "3.5"), every symbol (Unicode S*) split; "none" splits on whitespace only (text tokenized
beforehand). Smoothing of zero counts follows Chen & Cherry (2014): "exp" (sacrebleu's default, NIST:
the k-th zero precision becomes 1 / (2^k t_n)), "floor" (m_n := eps), "add-k" (m_n, t_n += k for n > 1) and "none".
tests/test_metrics.py checks score, precisions, BP and lengths against sacrebleu.corpus_bleu on fixed
pairs, tests/test_bleu_fuzz.py on random texts built to reach every tokenizer rule.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from ._inputs import References, as_reference_lists

MAX_ORDER = 4
SMOOTH_DEFAULTS: dict[str, Optional[float]] = {"exp": None, "floor": 0.1, "add-k": 1.0, "none": None}

# mteval-v13a's language-dependent rules. Each is one left-to-right pass of non-overlapping
# matches, in this order; both the order and the pass semantics change the output of strings
# such as "a.,b" or "1.-2", so they are kept exactly.
_SPLIT_RULES = (
    (re.compile(r"([!\"#$%&()*+/:;<=>?@\[\\\]^_`{|}~])"), r" \1 "),  # ASCII symbols except ' , - .
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period/comma not preceded by a digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period/comma not followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit ("1-2" -> "1 - 2")
)
_XML_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))  # order matters

# Code points sacrebleu's "zh" tokenizer treats as Chinese (inclusive ranges). Two entries of its
# table are written "\u20000"-"\u2a6d6" and "\u2f800"-"\u2fa1d": Python reads "\u2000" + "0", so
# the effective ranges are U+2001..U+2A6D (general punctuation, symbols, arrows, dingbats...) and
# U+2F81..U+2FA1, while CJK Extension B (U+20000..) is *not* split. We reproduce the effective
# behaviour, because matching the scores people publish is the point of this tokenizer.
_ZH_RANGES = (
    (0x2001, 0x2A6D), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF), (0x3000, 0x303F),
    (0x3100, 0x312F), (0x31A0, 0x31BF), (0x31C0, 0x31EF), (0x3200, 0x32FF), (0x3300, 0x33FF),
    (0x3400, 0x4DB5), (0x4E00, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A), (0xFA70, 0xFAD9),
    (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF),
)


@dataclass(frozen=True)
class BleuScore:
    """Corpus BLEU; attribute names follow sacrebleu's BLEUScore so code can switch between them.

    score: 0-100. precisions: the 4 (smoothed) n-gram precisions, 0-100. bp: brevity penalty.
    counts / totals: clipped matches m_n and hypothesis n-gram counts t_n (before smoothing).
    sys_len / ref_len: total hypothesis length c and effective reference length r, in tokens.
    ratio: c / r (0 when r is 0).
    """

    score: float
    precisions: tuple[float, ...]
    bp: float
    sys_len: int
    ref_len: int
    counts: tuple[int, ...]
    totals: tuple[int, ...]

    @property
    def ratio(self) -> float:
        """sys_len / ref_len (0 when ref_len is 0), as sacrebleu's BLEUScore.ratio."""
        return self.sys_len / self.ref_len if self.ref_len else 0

    def __str__(self) -> str:  # sacrebleu's str(BLEUScore), character for character
        precisions = "/".join(f"{p:.1f}" for p in self.precisions)
        return (f"BLEU = {self.score:.2f} {precisions} (BP = {self.bp:.3f} ratio = {self.ratio:.3f} "
                f"hyp_len = {self.sys_len} ref_len = {self.ref_len})")


def _split_punctuation(line: str) -> list[str]:
    for pattern, replacement in _SPLIT_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _XML_ENTITIES:
        line = line.replace(entity, char)
    # The padding lets the period/comma rules see a non-digit before a leading "." (".5" -> ". 5").
    return _split_punctuation(f" {line} ")


def _is_zh_char(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _ZH_RANGES)


def _tokenize_zh(line: str) -> list[str]:
    # No padding and no entity/newline handling here, unlike 13a: sacrebleu's zh skips both.
    return _split_punctuation("".join(f" {c} " if _is_zh_char(c) else c for c in line.strip()))


def _tokenize_char(line: str) -> list[str]:
    return [c for c in line if not c.isspace()]


def _split_pairs(line: str, first, second, spaced: str) -> str:
    """re.sub of the two-character pattern (first)(second) -> `spaced`.format(a, b): matches taken
    left to right without overlap, as a regex pass takes them ("a.." -> "a . ." only once)."""
    out, i = [], 0
    while i < len(line):
        if i + 1 < len(line) and first(line[i]) and second(line[i + 1]):
            out.append(spaced.format(line[i], line[i + 1]))
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def _is(major: str):
    """Whether a character's Unicode general category is in class `major` (P, N, S), as regex's \\p{major}."""
    return lambda c: unicodedata.category(c)[0] == major


def _tokenize_intl(line: str) -> list[str]:
    # sacrebleu's three passes, its \p{..} classes read from unicodedata (its `regex` module may know newer
    # code points than this Python's Unicode version): punctuation after a non-digit, then before one,
    # then symbols. "2024." keeps its dot, as in mteval-v14.
    is_p, is_n, is_s = _is("P"), _is("N"), _is("S")
    line = _split_pairs(line, lambda c: not is_n(c), is_p, "{} {} ")
    line = _split_pairs(line, is_p, lambda c: not is_n(c), " {} {}")
    return "".join(f" {c} " if is_s(c) else c for c in line).split()


# "none": sacrebleu's NoneTokenizer returns the line as is, and its n-gram counting splits it on whitespace.
_TOKENIZERS = {"13a": _tokenize_13a, "zh": _tokenize_zh, "char": _tokenize_char, "intl": _tokenize_intl,
               "none": str.split}


def bleu_tokenize(line: str, tokenize: str = "13a", lowercase: bool = False) -> list[str]:
    """The tokens corpus_bleu counts for `line`: optional lowercase, strip trailing space, tokenize."""
    if tokenize not in _TOKENIZERS:
        raise ValueError(f"corpus_bleu: tokenize={tokenize!r}, expected one of {sorted(_TOKENIZERS)}")
    if lowercase:
        line = line.lower()
    return _TOKENIZERS[tokenize](line.rstrip())


def _ngrams(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def _segment_stats(hyp: list[str], refs: list[list[str]]) -> tuple[int, int, list[int], list[int]]:
    """(hyp length, closest reference length, clipped matches per order, hypothesis n-grams per order)."""
    max_ref_counts: Counter = Counter()
    for ref in refs:
        max_ref_counts |= _ngrams(ref)  # Counter union keeps the max count over references
    matches, totals = [0] * MAX_ORDER, [0] * MAX_ORDER
    for gram, count in _ngrams(hyp).items():
        totals[len(gram) - 1] += count
        matches[len(gram) - 1] += min(count, max_ref_counts[gram])
    ref_len = min((len(r) for r in refs), key=lambda n: (abs(n - len(hyp)), n))
    return len(hyp), ref_len, matches, totals


def _precisions(matches: list[int], totals: list[int], smooth: str, value: float) -> tuple[list[float], int]:
    """Smoothed precisions (0-100) and the number of orders with at least one hypothesis n-gram."""
    precisions, seen_orders, exp_halvings = [0.0] * MAX_ORDER, 0, 1.0
    for n in range(MAX_ORDER):
        m, t = matches[n], totals[n]
        if smooth == "add-k" and n > 0:
            m, t = m + value, t + value
        if t == 0:
            break  # no n-grams of this order (every hypothesis is shorter than n): higher orders neither
        seen_orders = n + 1
        if m > 0:
            precisions[n] = 100.0 * m / t
        elif smooth == "exp":
            exp_halvings *= 2
            precisions[n] = 100.0 / (exp_halvings * t)
        elif smooth == "floor":
            precisions[n] = 100.0 * value / t
    return precisions, seen_orders


def _score_from_stats(sys_len: int, ref_len: int, matches: list[int], totals: list[int], smooth: str,
                      value: Optional[float], effective_order: bool) -> BleuScore:
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    stats = dict(bp=bp, sys_len=sys_len, ref_len=ref_len, counts=tuple(matches), totals=tuple(totals))
    if not any(matches):  # nothing matches at any order: 0, whatever the smoothing
        return BleuScore(score=0.0, precisions=(0.0,) * MAX_ORDER, **stats)
    precisions, seen_orders = _precisions(matches, totals, smooth, value)
    order = seen_orders if effective_order else MAX_ORDER
    used = precisions[:order]
    score = bp * math.exp(sum(math.log(p) for p in used) / order) if all(p > 0 for p in used) else 0.0
    return BleuScore(score=score, precisions=tuple(precisions), **stats)


def corpus_bleu(hypotheses: list[str], references: References, tokenize: str = "13a", smooth: str = "exp",
                smooth_value: Optional[float] = None, lowercase: bool = False,
                effective_order: bool = False) -> BleuScore:
    """Corpus BLEU-4 of `hypotheses` against `references` (0-100), equal to sacrebleu.corpus_bleu.

    references[i] is the reference string of hypotheses[i], or a list of its references (the
    transpose of sacrebleu's argument). tokenize: "13a", "zh", "char", "intl" or "none". smooth: "exp" (default),
    "floor" (smooth_value, default 0.1), "add-k" (smooth_value, default 1) or "none".
    effective_order=True averages only over the orders that have hypothesis n-grams (sacrebleu's
    use_effective_order); otherwise a corpus without any 4-gram scores 0.
    """
    if smooth not in SMOOTH_DEFAULTS:
        raise ValueError(f"corpus_bleu: smooth={smooth!r}, expected one of {list(SMOOTH_DEFAULTS)}")
    if smooth_value is not None and SMOOTH_DEFAULTS[smooth] is None:
        raise ValueError(f"corpus_bleu: smooth={smooth!r} takes no smooth_value (got {smooth_value})")
    value = SMOOTH_DEFAULTS[smooth] if smooth_value is None else smooth_value
    ref_lists = as_reference_lists(hypotheses, references, "corpus_bleu")
    sys_len = ref_len = 0
    matches, totals = [0] * MAX_ORDER, [0] * MAX_ORDER
    for hyp, refs in zip(hypotheses, ref_lists):
        h_len, r_len, m, t = _segment_stats(bleu_tokenize(hyp, tokenize, lowercase),
                                            [bleu_tokenize(r, tokenize, lowercase) for r in refs])
        sys_len, ref_len = sys_len + h_len, ref_len + r_len
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
    return _score_from_stats(sys_len, ref_len, matches, totals, smooth, value, effective_order)
