"""The Porter stemmer (Porter, 1980) as NLTK's PorterStemmer() runs it, which rouge-score uses.

rouge-score's use_stemmer=True calls nltk.stem.porter.PorterStemmer() in its default mode,
NLTK_EXTENSIONS: Porter's published algorithm, plus the changes Martin Porter made later, plus
NLTK's own. This module is that mode only; tests/test_rouge.py checks it word for word against
NLTK on every distinct word of the Python standard library's source and on generated words.

Definitions (on a lowercase word):
    vowel       a, e, i, o, u, and y when the letter before it is a consonant; every other
                character (digits included) is a consonant, so is y at the start of a word
    measure m   the number of vowel-run-then-consonant-run transitions: writing the word as
                [C](VC)^m[V], m counts the VC pairs (tree 0, trouble 1, troubles 2)
    *v*         the stem contains a vowel
    *d          the stem ends with a double consonant ("tt", "ss")
    *o          the stem ends consonant-vowel-consonant, the last not w, x or y ("hop");
                NLTK also accepts a two-letter vowel-consonant stem, w, x, y included ("at", "ow")

A step's rule list is tried in order and the first rule whose suffix the word ends with
decides: its condition true, the suffix is replaced, false, the word is left as it is (later
rules of the step are not tried). stem(word):
    0. lowercase; an irregular form (IRREGULAR) maps to its stem; words of 1-2 characters stay
    1a. sses -> ss, ies -> i ("ie" for a 4-letter word: ties -> tie), ss -> ss, s -> ""
    1b. ied -> i ("ie" for a 4-letter word); else (m>0) eed -> ee; else (*v*) ed or ing is
        removed and then: at -> ate, bl -> ble, iz -> ize, or *d but not l/s/z -> drop one
        letter, or m=1 and *o -> add e
    1c. y -> i when the letter before it is a consonant that is not the word's first letter
    2.  (m>0) STEP2 suffixes (ational -> ate, ...; alli -> al first, then step 2 again;
        logi -> log when the stem with its "l" has m>0)
    3.  (m>0) STEP3 suffixes (icate -> ic, ...)
    4.  (m>1) STEP4 suffixes removed (ion only after s or t)
    5a. e removed when m>1, or when m=1 and not *o
    5b. ll -> l when m>1
"""
from __future__ import annotations

from functools import lru_cache

VOWELS = frozenset("aeiou")

# NLTK's table of words the rules get wrong ("skies" would become "ski").
IRREGULAR = {
    "skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe",
    "proceed": "proceed", "exceed": "exceed", "succeed": "succeed",
}

# (suffix, replacement), in Porter's order: it matters where one suffix ends another
# ("ational" before "tional"). NLTK's "bli" replaces the paper's "abli"; "fulli" is NLTK's.
STEP2 = (("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
         ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
         ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
         ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
         ("fulli", "ful"))
STEP3 = (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
         ("ness", ""))
# Step 4 removes these; "ion" (Porter's after "ent") has its own condition: see _step4.
STEP4 = tuple((suffix, "") for suffix in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment",
                                          "ent", "ou", "ism", "ate", "iti", "ous", "ive", "ize"))


def _consonants(word: str) -> list[bool]:
    """flags[i]: word[i] is a consonant (a y is one when it starts the word or follows a vowel)."""
    flags: list[bool] = []
    for ch in word:
        flags.append(ch not in VOWELS and (ch != "y" or not flags or not flags[-1]))
    return flags


def _measure(stem: str) -> int:
    flags = _consonants(stem)
    return sum(1 for before, now in zip(flags, flags[1:]) if not before and now)


def _has_vowel(stem: str) -> bool:
    return not all(_consonants(stem))


def _ends_double_consonant(stem: str) -> bool:
    return len(stem) >= 2 and stem[-1] == stem[-2] and _consonants(stem)[-1]


def _ends_cvc(stem: str) -> bool:
    """*o: consonant-vowel-consonant, the last not w/x/y; or NLTK's two-letter vowel-consonant."""
    flags = _consonants(stem)
    if len(stem) == 2:
        return not flags[0] and flags[1]
    return len(stem) >= 3 and flags[-3] and not flags[-2] and flags[-1] and stem[-1] not in "wxy"


def _replace(word: str, rules: tuple[tuple[str, str], ...], min_measure: int) -> str:
    """The first rule whose suffix ends the word decides; it applies when the stem's m >= min_measure."""
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[:-len(suffix)]
            return stem + replacement if _measure(stem) >= min_measure else word
    return word


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-1]  # NLTK: ties -> tie, dies -> die (but flies -> fli)
    for suffix, replacement in (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")):
        if word.endswith(suffix):
            return word[:-len(suffix)] + replacement
    return word


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-1] if len(word) == 4 else word[:-2]  # NLTK: died -> die, spied -> spi
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[:-len(suffix)]):
            stem = word[:-len(suffix)]
            break
    else:
        return word
    # Give back the e that -ate, -ble and -ize lost ("conflat(ed)"), so that later steps see them.
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if _ends_double_consonant(stem):
        return stem if stem[-1] in "lsz" else stem[:-1]  # hopp(ing) -> hop, but fall(ing) -> fall
    return stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem  # fil(ing) -> file


def _step1c(word: str) -> str:
    stem = word[:-1]
    if word.endswith("y") and len(stem) > 1 and _consonants(stem)[-1]:
        return stem + "i"  # happy -> happi, but enjoy, by stay
    return word


def _step2(word: str) -> str:
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-2])  # NLTK: alli -> al before the list, then the list again
    if word.endswith("logi"):  # no STEP2 suffix ends in "logi", so this is the list's last rule
        return word[:-1] if _measure(word[:-3]) > 0 else word  # the "l" counts in m: geo-logi
    return _replace(word, STEP2, 1)


def _step3(word: str) -> str:
    return _replace(word, STEP3, 1)


def _step4(word: str) -> str:
    if word.endswith("ion"):  # no other STEP4 suffix ends in "ion": its place in the list is moot
        stem = word[:-3]
        return stem if _measure(stem) > 1 and stem[-1] in "st" else word
    return _replace(word, STEP4, 2)


def _step5(word: str) -> str:
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            word = stem  # probate -> probat, cease -> ceas, but rate stays
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]  # controll -> control, but roll stays
    return word


@lru_cache(maxsize=1 << 16)  # ROUGE stems the same few thousand words over and over
def porter_stem(word: str) -> str:
    """The stem of `word`, equal to nltk.stem.porter.PorterStemmer().stem(word)."""
    lower = word.lower()
    if lower in IRREGULAR:
        return IRREGULAR[lower]
    if len(word) <= 2:
        return lower
    for step in (_step1a, _step1b, _step1c, _step2, _step3, _step4, _step5):
        lower = step(lower)
    return lower
