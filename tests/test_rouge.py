"""ROUGE-Lsum and stemming (minipeft.metrics.rouge_metric, .porter) against rouge-score and NLTK.

The Porter stemmer is compared word for word with nltk's PorterStemmer() (the mode rouge-score
builds) and rouge-score's stemming tokenizer; ROUGE-Lsum and stemmed ROUGE with
rouge_score.rouge_scorer.RougeScorer on random multi-line texts. Both sides count the same
integers and divide them the same way, so scores are compared to 1e-12 (the promise is 1e-6):
only a counting, line-splitting or stemming difference could move them, and those move scores by
far more. Tokenization itself ("en", "zh", "intl") is proven in tests/test_metrics.py.
"""
from __future__ import annotations

import glob
import itertools
import random
import re
import sysconfig

import pytest
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer, tokenizers

from minipeft.metrics import ROUGE_TYPES, porter_stem, rouge, rouge_pair, rouge_tokenize
from minipeft.metrics.porter import IRREGULAR, STEP2, STEP3, STEP4

TOL = 1e-12


# ------------------------------------------------------------------------------- Porter stemmer

def _stdlib_words() -> set[str]:
    """Every distinct [a-z0-9]+ word of the Python standard library's top-level modules (docstrings,
    comments, identifiers): English of every part of speech, plus abbreviations and numbers."""
    words = set()
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py")):
        with open(path, encoding="utf-8", errors="replace") as f:
            words.update(re.findall(r"[a-z0-9]+", f.read().lower()))
    return words


def _generated_words(n: int, seed: int = 0) -> set[str]:
    """Random stems (vowels, y, consonants, doubled letters, digits) + 0-2 suffixes the rules look for:
    they reach rule conditions (measure, *o, *d, y as a vowel) that real words rarely combine."""
    suffixes = [s for s, _ in STEP2 + STEP3 + STEP4] + ["ion", "sion", "tion", "logi", "sses", "ies", "ss", "s",
                                                         "ied", "eed", "ed", "ing", "at", "bl", "iz", "y", "e", "ll"]
    rng = random.Random(seed)
    return {"".join(rng.choice("aeiouybcdlstwxzmnrp0") for _ in range(rng.randint(0, 6)))
            + "".join(rng.choice(suffixes) for _ in range(rng.randint(0, 2))) for _ in range(n)}


@pytest.fixture(scope="module")
def words() -> list[str]:
    short = {"".join(p) for n in range(1, 5) for p in itertools.product("aeylst", repeat=n)}
    out = sorted((_stdlib_words() | _generated_words(60000) | short | set(IRREGULAR)) - {""})
    assert len(out) > 60000
    return out


def test_porter_stem_matches_nltk_word_for_word(words):
    nltk_stem = PorterStemmer().stem  # rouge-score's tokenizers.DefaultTokenizer builds it like this
    assert [w for w in words if porter_stem(w) != nltk_stem(w)] == []
    mixed_case = ["Running", "SKIES", "Generalizations", "ÉTÉS", "y" * 2000]
    assert [porter_stem(w) for w in mixed_case] == [nltk_stem(w) for w in mixed_case]


def test_stemming_tokenizer_matches_rouge_score(words):
    text = " ".join(words)  # rouge-score stems only tokens longer than 3 characters
    assert rouge_tokenize(text, use_stemmer=True) == tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)


def test_porter_stem_examples():
    # Porter's paper and NLTK's extensions, one per step.
    examples = {"caresses": "caress", "ponies": "poni", "ties": "tie", "cats": "cat", "agreed": "agre",
                "plastered": "plaster", "motoring": "motor", "hopping": "hop", "falling": "fall", "filing": "file",
                "conflated": "conflat", "happy": "happi", "enjoy": "enjoy", "relational": "relat",
                "radically": "radic", "geology": "geolog", "hopeful": "hope", "adoption": "adopt",
                "probate": "probat", "controlling": "control", "skies": "sky", "dying": "die", "news": "news"}
    assert {w: porter_stem(w) for w in examples} == examples


# ------------------------------------------------------------------------------------ ROUGE-Lsum

EN_VOCAB = ["the", "cat", "sat", "on", "mat", "a", "dog", "model", "models", "modeling", "modeled", "run", "runs",
            "running", "general", "generalization", "generalize", "happy", "happiness", "sky", "skies", "dying",
            "die", "LoRA", "rank-8", "state-of-the-art", "3.5%", "it's", "café"]
ZH_INTL_VOCAB = ["模型", "微调", "数据", "的", "很", "好", "模", "型", "модель", "модели", "мир", "γάτα",
                 "안녕하세요", "LoRA", "models", "model", "the", "running", "3.5"]


def _random_text(rng: random.Random, vocab: list[str], joiners: tuple[str, ...]) -> str:
    """0-4 lines of 0-8 words from a small vocabulary (repeated tokens, several LCSs), some lines
    empty, blank or punctuation only, "\r\n" endings, leading and trailing newlines."""
    lines = []
    for _ in range(rng.randint(0, 4)):
        line = rng.choice(joiners).join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
        lines.append(line + rng.choice(["", "", ".", "\r", " ", "!!"]))
    return "\n".join(lines)


def _random_pairs(vocab: list[str], joiners: tuple[str, ...], n: int = 400, seed: int = 0):
    rng = random.Random(seed)
    pairs = [(_random_text(rng, vocab, joiners), _random_text(rng, vocab, joiners)) for _ in range(n)]
    return pairs + [("", ""), ("", "a b"), ("a b", ""), ("\n\n", "a\n\nb"), ("b a\nb", "a b")]


class _Tokenizer:
    """rouge-score tokenizer object for our zh/intl tokenization (itself proven in test_metrics.py)."""

    def __init__(self, lang: str, use_stemmer: bool):
        self.lang, self.use_stemmer = lang, use_stemmer

    def tokenize(self, text):
        return rouge_tokenize(text, self.lang, self.use_stemmer)


def _assert_scores_equal(ours, ref, context):
    for t in ROUGE_TYPES:
        assert tuple(ours[t]) == pytest.approx(tuple(ref[t]), abs=TOL), (t, context)


def _assert_pairs_match_rouge_score(pairs, scorer, **kwargs):
    for h, r in pairs:  # rouge-score takes (target, prediction)
        _assert_scores_equal(rouge_pair(h, r, **kwargs), scorer.score(r, h), (h, r))
    # Several references: the best F1 per type (score_multi), then corpus means.
    for h, r in pairs[:100]:
        refs = [r, h.upper(), r + "\n" + h]
        _assert_scores_equal(rouge_pair(h, refs, **kwargs), scorer.score_multi(refs, h), (h, refs))
    corpus = rouge([h for h, _ in pairs], [r for _, r in pairs], **kwargs)
    refs = [scorer.score(r, h) for h, r in pairs]
    for t in ROUGE_TYPES:
        for key, field in ((t, "fmeasure"), (f"{t}_precision", "precision"), (f"{t}_recall", "recall")):
            assert corpus[key] == pytest.approx(sum(getattr(s[t], field) for s in refs) / len(refs), abs=TOL)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_english_multiline_matches_rouge_score(use_stemmer):
    pairs = _random_pairs(EN_VOCAB, (" ", ", ", " - ", "  "))
    _assert_pairs_match_rouge_score(pairs, rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer),
                                     use_stemmer=use_stemmer)
    # Not vacuous: Lsum differs from L on many pairs, and stemming changes scores.
    scores = [rouge_pair(h, r, use_stemmer=use_stemmer) for h, r in pairs]
    assert sum(s["rougeLsum"] != s["rougeL"] for s in scores) > 50
    assert rouge([h for h, _ in pairs], [r for _, r in pairs], use_stemmer=True) != rouge(
        [h for h, _ in pairs], [r for _, r in pairs])


@pytest.mark.parametrize("lang", ["zh", "intl"])
@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_zh_intl_multiline_matches_rouge_score(lang, use_stemmer):
    # Chinese is written without spaces: lines join words with "" as well as with spaces.
    pairs = _random_pairs(ZH_INTL_VOCAB, ("", " ", "，", ", "), seed=1)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_Tokenizer(lang, use_stemmer))
    _assert_pairs_match_rouge_score(pairs, scorer, lang=lang, use_stemmer=use_stemmer)
    assert rouge(["模型很好\n\n数据"], ["模型很好\n数据"], lang=lang)["rougeLsum"] == 1.0


def test_rouge_lsum_definition():
    # Two LCSs of "a b" and "b a" ("a" and "b"): rouge-score's union takes "a" from the first line,
    # so "b" comes from the second: 2 hits of 3 hypothesis tokens.
    assert tuple(rouge_pair("b a\nb", "a b")["rougeLsum"]) == pytest.approx((2 / 3, 1.0, 0.8), abs=TOL)
    # A hypothesis token is matched once, however many reference lines it serves: "a" counts once.
    assert tuple(rouge_pair("a", "a\na")["rougeLsum"]) == pytest.approx((1.0, 0.5, 2 / 3), abs=TOL)
    # Only "\n" separates sentences; lines without tokens change nothing.
    assert rouge_pair("x y.\r\n\n  \n!!\nz", "x y\nz")["rougeLsum"] == rouge_pair("x y\nz", "x y\nz")["rougeLsum"]
    assert rouge_pair("", "a\nb")["rougeLsum"] == rouge_pair("\n\n", "a")["rougeLsum"] == (0.0, 0.0, 0.0)
    # One line on each side: ROUGE-Lsum is ROUGE-L.
    rng = random.Random(2)
    for _ in range(200):
        h, r = (" ".join(rng.choice(EN_VOCAB) for _ in range(rng.randint(0, 12))) for _ in range(2))
        scores = rouge_pair(h, r)
        assert scores["rougeLsum"] == scores["rougeL"]


def test_rouge_stemming_option():
    assert rouge_tokenize("The models were running, 1990s", use_stemmer=True) == ["the", "model", "were", "run",
                                                                                 "1990"]
    # Porter's rules are English: in "zh" and "intl" only ASCII words are stemmed.
    assert rouge_tokenize("模型 models моделями", lang="intl", use_stemmer=True) == ["模", "型", "model", "моделями"]
    assert rouge_tokenize("用LoRA微调models", lang="zh", use_stemmer=True) == ["用", "lora", "微", "调", "model"]
    plain, stemmed = rouge(["models running"], ["model runs"]), rouge(["models running"], ["model runs"],
                                                                      use_stemmer=True)
    assert plain["rouge1"] == 0.0 and stemmed["rouge1"] == stemmed["rougeLsum"] == 1.0
    assert set(stemmed) == {f"{t}{s}" for t in ROUGE_TYPES for s in ("", "_precision", "_recall")}


def test_every_metric_module_and_the_functions_exported_are_both_reachable():
    # The package re-exports functions such as `rouge` and `exact_match`; a module of the same name would
    # be hidden: `import minipeft.metrics.<module> as m` (which reads the package's attribute) gives the function.
    import importlib
    import pkgutil

    import minipeft.metrics as metrics
    for info in pkgutil.iter_modules(metrics.__path__):
        module = importlib.import_module(f"minipeft.metrics.{info.name}")
        assert getattr(metrics, info.name) is module, info.name
    assert importlib.import_module(rouge.__module__).rouge_pair is rouge_pair and callable(rouge)
    assert callable(metrics.exact_match)
