"""BLEU (minipeft.metrics.bleu) against sacrebleu on seeded random texts and corpora.

tests/test_metrics.py proves fixed pairs; here a generator built to reach every tokenizer rule draws
hundreds of texts and corpora per tokenizer: 13a's regex passes (ASCII symbols, "." and "," next to
digits or not, "-" after a digit), its entities, "<skipped>" and end-of-line hyphens, zh's CJK ranges
and fullwidth forms, intl's Unicode punctuation/symbol/number classes, char and none on every kind of
whitespace, with lowercasing that changes lengths ("İ" -> "i̇"). Token lists must be equal; score,
precisions, BP, lengths (and counts/totals) as in test_metrics.py: 1e-9, only a counting or
tokenization bug could move them.
"""
from __future__ import annotations

import random
import unicodedata

import pytest
import sacrebleu

from minipeft.metrics import bleu_tokenize, corpus_bleu
from test_metrics import _assert_bleu_equal

TOKENIZERS = ["13a", "zh", "char", "intl", "none"]
SMOOTHING = [("exp", None), ("floor", None), ("floor", 0.0), ("floor", 0.5), ("add-k", None), ("add-k", 0.0),
             ("add-k", 2.0), ("none", None)]

# Pieces of text, by the rule they reach. Joined with "" as often as with spaces, so they touch.
ATOMS = {
    "word": ["the", "cat", "The", "CAT", "LoRA", "it's", "don't", "'quoted'", "state-of-the-art", "e.g.", "U.S.",
             "x", "a", "İstanbul", "Straße", "ǅemal", "ΣΑΣ", "naïve", "Привет", "γάτα", "مرحبا"],
    "number": ["1", "2024", "3.5", "1,000", "1-2", ".5", "5.", ",5", "1.-2", "0,5", "10-", "-3", "2.0.1", "1..2",
               "4,", "٣", "²", "½", "Ⅻ", "१", "１２３", "𝟘"],
    "ascii_punct": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "--", "a.,b", "?!", ".,", ",."],
    "13a_special": ["&quot;", "&amp;", "&lt;", "&gt;", "&amp;quot;", "&amp;lt;", "&QUOT;", "&", "&apos;", "&#39;",
                    "<skipped>", "<SKIPPED>", "<skipped", "-\n", "-\r\n", "x-\n", "1-\n2"],
    "unicode_punct": list("—–…«»“”‘’„¿¡·、。，！？《》【】「」‐‧※§¶†‡•′″‹›⁇﹏︰〃"),
    "cjk": ["模型", "数据", "的", "很", "好", "𠀀", "𪚥", "漢字", "カタカナ", "ひらがな", "한국어", "㐀", "豈", "⺀",
            "⼀", "ㄅ", "㈠", "㌀"],
    "fullwidth": ["ＧＰＴ", "ｇｐｔ", "－", "．", "，", "：", "＄", "（", "）", "～", "ｶ", "￥"],
    "combining": ["e\u0301", "a\u0308", "\u0301", "n\u0303", "\u20dd", "\u0915\u094d\u0937"],
    "emoji": ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "☺", "★", "🙂🙃", "🫨"],
    "symbol": list("$€£¥₽₹+±×÷∑√∞≤°©®™^~|<>=→←⇒⌘♥♪✓✔⚡☃"),
    "space": [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\x0b", "\x1c", "\x85", "\u2009",
              "\u200b", "\ufeff"],
}
# Left out: code points this Python's unicodedata does not know (🫨 U+1FAE8 is Unicode 15; Python 3.11 has 14).
# sacrebleu's intl reads \p{P}/\p{S}/\p{N} from its `regex` module's newer database, which calls them symbols;
# minipeft reads unicodedata, by choice (bleu.py). Not a bug on either side: each follows its Unicode version.
ATOMS = {kind: [a for a in atoms if all(unicodedata.category(c) != "Cn" for c in a)] for kind, atoms in ATOMS.items()}
# Raw characters, for adjacencies the atoms never form ("1.-2", ".,", "&amp;" split by a letter...).
ALPHABET = sorted({c for atoms in ATOMS.values() for a in atoms for c in a} | set("abXY0123456789 .,-"))


def _atom(rng: random.Random) -> str:
    return rng.choice(ATOMS[rng.choice(list(ATOMS))])


def _random_text(rng: random.Random) -> str:
    """Empty, blank or one-token strings; raw character soup; or 1-12 atoms with random joiners."""
    r = rng.random()
    if r < 0.08:
        return rng.choice(["", " ", "\n", _atom(rng)])
    if r < 0.3:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 15)))
    return "".join(_atom(rng) + rng.choice(["", " ", " ", " ", rng.choice(ATOMS["space"])])
                   for _ in range(rng.randint(1, 12)))


def _near(rng: random.Random, text: str) -> str:
    """A reference sharing n-grams with `text`: pieces dropped, replaced, recased, inserted (longer or shorter)."""
    out = []
    for piece in text.split(" "):
        r = rng.random()
        if r < 0.15:
            continue
        if r < 0.3:
            out.append(_atom(rng))
        if r < 0.4:
            piece = piece.upper() if rng.random() < 0.5 else piece.lower()
        out.append(piece)
    for _ in range(rng.randint(0, 3)):
        out.insert(rng.randint(0, len(out)), _atom(rng))
    return " ".join(out)


def _random_corpus(rng: random.Random) -> tuple[list[str], list[list[str]]]:
    """1-5 segments, each with 1-3 references: mostly near the hypothesis, some unrelated, some empty."""
    hyps, refs = [], []
    for _ in range(rng.randint(1, 5)):
        hyp = _random_text(rng)
        refs.append(["" if r < 0.1 else _random_text(rng) if r < 0.25 else _near(rng, hyp)
                     for r in (rng.random() for _ in range(rng.choice([1, 1, 2, 3])))])
        hyps.append("" if rng.random() < 0.05 else hyp)
    return hyps, refs


@pytest.mark.parametrize("tokenize", TOKENIZERS)
def test_tokenizers_match_sacrebleu_on_random_texts(tokenize):
    rng = random.Random(f"tokens-{tokenize}")
    texts = [_random_text(rng) if rng.random() < 0.5 else _near(rng, _random_text(rng)) for _ in range(1000)]
    reference = sacrebleu.BLEU(tokenize=tokenize).tokenizer
    for lowercase in (False, True):
        for text in texts:
            # sacrebleu's path: BLEU._preprocess_segment (lower, rstrip, tokenize), then the n-gram split.
            expected = reference((text.lower() if lowercase else text).rstrip()).split()
            assert bleu_tokenize(text, tokenize, lowercase) == expected, (text, lowercase)
    # Not vacuous: the tokenizer changes the whitespace split of many texts (except "none", which is that split).
    changed = sum(bleu_tokenize(t, tokenize) != t.split() for t in texts)
    assert changed == 0 if tokenize == "none" else changed > 300


@pytest.mark.parametrize("tokenize", TOKENIZERS)
def test_corpus_bleu_matches_sacrebleu_on_random_corpora(tokenize):
    rng = random.Random(f"corpora-{tokenize}")
    scores, bps = [], []
    for _ in range(300):
        hyps, refs = _random_corpus(rng)
        # sacrebleu's layout: one stream per reference rank, None where a segment has fewer references.
        streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]
        effective_order = rng.random() < 0.3
        for smooth, value in SMOOTHING:
            for lowercase in (False, True):
                options = dict(tokenize=tokenize, smooth_value=value, lowercase=lowercase)
                ours = corpus_bleu(hyps, refs, smooth=smooth, effective_order=effective_order, **options)
                ref = sacrebleu.corpus_bleu(hyps, streams, smooth_method=smooth, use_effective_order=effective_order,
                                            **options)
                context = (hyps, refs, smooth, value, lowercase, effective_order)
                try:
                    _assert_bleu_equal(ours, ref)
                except AssertionError as e:
                    raise AssertionError(f"{e}\n{context}") from None
                if smooth != "add-k":  # sacrebleu adds k to its counts in place; ours are the raw ones
                    assert (list(ours.counts), list(ours.totals)) == (list(ref.counts), list(ref.totals)), context
                scores.append(ours.score)
                bps.append(ours.bp)
    # Not vacuous: partial matches, perfect and zero scores, and both sides of the brevity penalty occur.
    assert sum(0 < s < 100 for s in scores) > 800 and any(s == 0 for s in scores)
    assert any(b < 1 for b in bps) and any(b == 1 for b in bps)
