"""Copy exercises: in-context copying for a base model that sees only a few million tokens.

A model copies a span from its context with *induction heads*: one head marks each token with
the token before it, a second attends from the current token to the place where that token
occurred before and predicts what followed it there. Large models grow them from natural text;
a 5M-parameter model that sees 3M tokens of the Python docs did not (its loss on the second copy
of a random token sequence equals its loss on the first: `induction_accuracy` below is 0).
Extraction tasks (the json_extract demo) need exactly this skill, and more: a name that follows
a space in the sentence ("▁An", "n", "a") is a different token sequence after a quote in the
JSON reply ('"', "A", "n", "n", "a"), so the copy must work on characters, across tokenizations.

An exercise is a document built from a passage of the training text itself (no other data):

    <passage: a few paragraphs, at most `PASSAGE_CHARS` characters>

    <recall: some of the passage's phrases (1-3 words, outer punctuation stripped), in one of
     RECALL_FORMATS: a JSON list of strings, a "- " list, a "; "-separated line>

or, one format of five each, the passage repeated verbatim, or up to 40 of its words shuffled and
written twice (`shuffled_twice`: there only copying predicts the second line). The first token of a
recalled phrase is a guess (which phrase comes next is random); every later token is predictable
by copying.
`copy_exercises` turns a seeded share of the training passages into exercises that join the
training documents; held-out documents never get exercises, so held-out perplexity stays a
measure of plain text.

A *drill* (`repeat_drill`) is a training window of random token ids in which every piece is
written two or three times: nothing but copying predicts a repeat, so the loss on drills pushes
hardest towards induction heads. This architecture (5 layers, d=256) formed them from scratch after
~1,300 steps of drills alone (16 x 96 tokens) at a constant rate with AdamW beta2 = 0.95, and kept
them through a text phase with a fifth of drills: the shipped base model was made so. The copy
exercises above, diluted in text, never formed them (the model card, models/minillama-10m/README.md,
has the trials and the commands).

`induction_accuracy` is the standard probe: a random token sequence shown twice; the share of
tokens of the second copy that the model predicts greedily (a model without induction: ~0).

Tests: tests/test_exercises.py.
"""
from __future__ import annotations

import json
import random
import re
from typing import Callable, Sequence

import torch

from .model import Transformer

PASSAGE_CHARS = 420  # with its recall, an exercise fits the 256-token training window
STRIP = " \t\n.,;:!?()[]{}<>\"'`*"


def passages(doc: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive paragraphs of `doc` grouped into passages of at most max_chars characters
    (a longer paragraph is a passage of its own, cut at max_chars)."""
    out, cur = [], ""
    for para in (p.strip() for p in doc.split("\n\n")):
        if not para:
            continue
        if cur and len(cur) + 2 + len(para) > max_chars:
            out.append(cur)
            cur = ""
        cur = (cur + "\n\n" + para if cur else para)[:max_chars]
    return out + [cur] if cur else out


def phrases(passage: str, k: int, rng: random.Random) -> list[str]:
    """k phrases of 1-3 consecutive words of one line of the passage, outer punctuation stripped,
    in random order (fewer if the passage has fewer distinct ones)."""
    lines = [(line, [m.span() for m in re.finditer(r"\S+", line)]) for line in passage.splitlines()]
    lines = [(line, spans) for line, spans in lines if spans]
    found: list[str] = []
    for _ in range(4 * k if lines else 0):
        (line, spans), n = rng.choice(lines), rng.randint(1, 3)
        start = rng.randrange(max(1, len(spans) - n + 1))
        end = spans[min(start + n, len(spans)) - 1][1]
        phrase = line[spans[start][0]:end].strip(STRIP)  # verbatim: inner spacing kept
        if phrase and phrase not in found:
            found.append(phrase)
        if len(found) == k:
            break
    return found


RECALL_FORMATS: dict[str, Callable[[list[str]], str]] = {
    "json": lambda ps: json.dumps(ps, ensure_ascii=False),
    "dash": lambda ps: "\n".join("- " + p for p in ps),
    "line": lambda ps: "; ".join(ps) + ".",
}


def shuffled_twice(passage: str, rng: random.Random) -> str:
    """Up to 40 of the passage's words in random order, then the same words again on the next
    line: bigram statistics cannot predict the second line, only copying the first can."""
    words = passage.split()
    rng.shuffle(words)
    line = " ".join(words[:40])
    return line + "\n" + line


def exercise(passage: str, rng: random.Random) -> str:
    """One copy exercise from a passage: the passage, a blank line, then its recall."""
    form = rng.choice([*RECALL_FORMATS, "repeat", "shuffled"])
    if form == "repeat":
        recall = passage
    elif form == "shuffled":
        recall = shuffled_twice(passage, rng)
    else:
        recall = RECALL_FORMATS[form](phrases(passage, rng.randint(3, 8), rng))
    return passage + "\n\n" + recall


def copy_exercises(docs: Sequence[str], fraction: float, seed: int = 0,
                   max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Exercises from a seeded `fraction` of all passages (of at most max_chars characters) of
    `docs`, in corpus order."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"copy_fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    return [exercise(p, rng) for doc in docs for p in passages(doc, max_chars) if rng.random() < fraction]


def repeat_drill(rng: random.Random, vocab_size: int, length: int, low: int = 300,
                 piece: tuple[int, int] = (4, 30)) -> list[int]:
    """`length` ids: pieces of piece[0]..piece[1] ids drawn uniformly from [low, vocab_size)
    (above the special and byte pieces; low is capped at vocab_size / 2, as in the probe below),
    each written 2 or 3 times in a row, until the window is full (the last piece is cut).

    No <s>: a drill is not a document. A model whose drills began with <s>, like its texts,
    learned that what follows <s> may be noise, and read every prompt (all start with <s>) as a
    drill until something repeated: ~8 nats, a uniform guess, on each of its first 10 tokens.
    (A drills-only run opens them with <s>: pretrain.training_windows.)"""
    low, ids = min(low, vocab_size // 2), []
    while len(ids) < length:
        seg = [rng.randrange(low, vocab_size) for _ in range(rng.randint(*piece))]
        ids += seg * rng.randint(2, 3)
    return ids[:length]


@torch.no_grad()
def induction_accuracy(model: Transformer, length: int = 40, batch: int = 16, low: int = 300,
                       seed: int = 0) -> float:
    """Greedy accuracy on the second copy of `batch` random sequences of `length` ids drawn from
    [low, vocab_size) (above the special and byte pieces; low is capped at vocab_size / 2 for tiny
    vocabularies), each shown twice after <s>:

        <s> x_1 .. x_L x_1 .. x_L   scored: predictions of x_2 .. x_L in the second copy

    (x_1's second occurrence follows x_L, which appeared once: not predictable by copying)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randint(min(low, cfg.vocab_size // 2), cfg.vocab_size, (batch, length), generator=g)
    bos = torch.full((batch, 1), cfg.bos_token_id if cfg.bos_token_id is not None else 1)
    ids = torch.cat([bos, x, x], dim=1).to(next(model.parameters()).device)
    was_training = model.training
    logits = model.eval()(ids)
    model.train(was_training)
    # logits at position t predict ids[t + 1]; second copy's x_2 .. x_L sit at 1 + length + 1 ..
    pred = logits[:, length + 1:-1].argmax(-1)
    return (pred == ids[:, length + 2:]).float().mean().item()
