"""The outline's quality criteria (section 3.2) that a program can measure on the examples alone:
label conflicts (accuracy), format consistency, and diversity.

- Conflict: the same prompt (normalized, dedup.prompt_key) with different outputs. For a
  classifier that is a label error; for open generation it may be intended, so it is listed, not judged.
- Consistency: a property shared by at least 1 - MINORITY = 80% of the examples is the file's
  convention, and the examples without it are listed (outputs that are JSON in most examples but
  not in these; JSON objects with a different key set; a system prompt in most but not these;
  stray leading/trailing whitespace in outputs; one label spelled several ways).
- Diversity: distinct prompts and outputs; distinct-n = distinct n-grams / all n-grams of the
  outputs (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"), words being runs of letters/digits and each CJK character on its own; the most
  common first words of the first user turn (Self-Instruct's verb diversity, Wang et al. 2023).
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

from .dedup import normalize_text, prompt_key
from .formats import Example

MINORITY = 0.2
LABEL_MAX = 50  # outputs are class labels when there are at most this many distinct ones ...
# ... and at most half as many as examples (else most labels are seen once: free text)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
CLIP = 120  # characters of a prompt or output quoted in the report


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= CLIP else text[:CLIP - 3] + "..."


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def labels(examples: list[Example]) -> Optional[list[str]]:
    """Each example's normalized output when the outputs look like class labels, else None."""
    keys = [normalize_text(e.response) for e in examples]
    distinct = len(set(keys))
    return keys if keys and distinct <= min(LABEL_MAX, len(keys) / 2) else None


def label_conflicts(examples: list[Example]) -> list[dict[str, Any]]:
    """Prompts given more than one distinct output: [{"prompt", "outputs": [{"output", "lines"}]}]."""
    by_prompt: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_prompt[prompt_key(e)].append(e)
    conflicts = []
    for group in by_prompt.values():
        answers: dict[str, list[Example]] = defaultdict(list)
        for e in group:
            answers[normalize_text(e.response)].append(e)
        if len(answers) > 1:
            outputs = [{"output": clip(same[0].response), "lines": [e.line for e in same]} for same in answers.values()]
            conflicts.append({"prompt": clip(group[0].prompt), "outputs": outputs})
    return conflicts


def format_consistency(examples: list[Example]) -> list[dict[str, Any]]:
    """Findings [{"check", "convention", "count", "total", "lines"}]: the exceptions to each convention."""
    parsed = [_json_container(e.response) for e in examples]
    checks: list[tuple[str, list[Example], Callable[[int, Example], bool]]] = [
        ("output is JSON (object or array)", examples, lambda i, e: parsed[i] is not None),
        ("has a system prompt", examples, lambda i, e: e.messages[0]["role"] == "system"),
        ("output has no leading or trailing whitespace", examples, lambda i, e: e.response == e.response.strip()),
    ]
    objects = [e for e, v in zip(examples, parsed) if isinstance(v, dict)]
    keysets = [tuple(sorted(v)) for v in parsed if isinstance(v, dict)]
    if keysets:
        common = Counter(keysets).most_common(1)[0][0]
        checks.append((f"JSON output has exactly the keys {list(common)}", objects, lambda i, e: keysets[i] == common))
    findings = [f for name, group, test in checks if (f := _exceptions(name, group, test))]
    return findings + _label_spellings(examples)


def _exceptions(name: str, group: list[Example], test: Callable[[int, Example], bool]) -> Optional[dict[str, Any]]:
    flags = [test(i, e) for i, e in enumerate(group)]
    held = sum(flags)
    convention = held >= len(flags) - held
    lines = [e.line for e, f in zip(group, flags) if f != convention]
    if not lines or len(lines) > MINORITY * len(group):
        return None
    return {"check": name, "convention": convention, "count": len(group) - len(lines), "total": len(group),
            "lines": lines}


def _label_spellings(examples: list[Example]) -> list[dict[str, Any]]:
    """A label written several ways ("Positive", "positive", "positive "): one finding per label,
    the most common spelling taken as the convention and the others' lines listed."""
    if labels(examples) is None:
        return []
    spellings: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for e in examples:
        spellings[normalize_text(e.response)][e.response].append(e.line)
    findings = []
    for ways in spellings.values():
        if len(ways) > 1:
            main, *others = sorted(ways, key=lambda w: -len(ways[w]))
            # the label as most lines write it; "label 'positive' is spelled 'positive'" said nothing
            findings.append({"check": f"label {main!r} written exactly so", "convention": True,
                             "count": len(ways[main]), "total": sum(map(len, ways.values())),
                             "lines": sorted(n for w in others for n in ways[w]),
                             "other_spellings": {w: ways[w] for w in others}})
    return findings


def _json_container(text: str) -> Optional[Any]:
    """The parsed output if it is a JSON object or array (a bare number or word is not "JSON output")."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def diversity(examples: list[Example], top: int = 10) -> dict[str, Any]:
    outputs = [words(e.response) for e in examples]
    firsts = Counter(w[0] for e in examples if (w := words(_first_user(e))))
    return {
        "distinct_prompts": len({prompt_key(e) for e in examples}),
        "distinct_outputs": len({normalize_text(e.response) for e in examples}),
        "distinct_1": distinct_n(outputs, 1),
        "distinct_2": distinct_n(outputs, 2),
        "top_first_words": firsts.most_common(top),
    }


def distinct_n(texts: list[list[str]], n: int) -> Optional[float]:
    """Distinct n-grams / all n-grams over `texts` (lists of words); None when there are none."""
    grams = [tuple(w[i:i + n]) for w in texts for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _first_user(example: Example) -> str:
    return next(m["content"] for m in example.messages if m["role"] == "user")
