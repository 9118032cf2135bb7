"""minipeft.exercises: copy exercises built from a passage, and the induction probe."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minipeft.exercises import (PASSAGE_CHARS, RECALL_FORMATS, copy_exercises, exercise, induction_accuracy,
                                passages, phrases, repeat_drill)
from conftest import tiny_model

DOC = "\n\n".join(f"Paragraph {i} says that the value of x{i} is {i * 7}, (not {i})." for i in range(40))


def test_passages_group_whole_paragraphs():
    ps = passages(DOC, max_chars=120)
    paragraphs = DOC.split("\n\n")
    assert "\n\n".join(ps) == DOC  # nothing lost, nothing reordered
    assert all(len(p) <= 120 for p in ps) and all(set(p.split("\n\n")) <= set(paragraphs) for p in ps)
    assert passages("x" * 50, max_chars=20) == ["x" * 20]  # an over-long paragraph is cut
    assert passages("\n\n \n\n") == []


def test_phrases_are_words_of_the_passage():
    passage = passages(DOC)[0]
    words = passage.split()
    for seed in range(20):
        found = phrases(passage, 6, random.Random(seed))
        assert 1 <= len(found) <= 6 and len(set(found)) == len(found)
        for p in found:
            assert p == p.strip(" .,()") and 1 <= len(p.split()) <= 3 and "\n" not in p
            n = len(p.split())  # some run of n consecutive words, outer punctuation stripped, gives p
            assert any(" ".join(words[i:i + n]).strip(" .,()") == p for i in range(len(words)))
    code = "x  =  compute(a,   b)\n\n    return   x"
    assert all(p in code for p in phrases(code, 8, random.Random(1)))  # verbatim, spacing kept


def test_every_recall_format_appears_and_parses():
    rng, seen = random.Random(0), set()
    passage = passages(DOC)[1]
    for _ in range(60):
        text = exercise(passage, rng)
        assert text.startswith(passage + "\n\n")
        recall = text[len(passage) + 2:]
        first, _, second = recall.partition("\n")
        if recall == passage:
            seen.add("repeat")
        elif first == second:
            assert set(first.split()) <= set(passage.split())  # the passage's words, shuffled, twice
            seen.add("shuffled")
        elif recall.startswith("["):
            assert all(p in passage for p in json.loads(recall))
            seen.add("json")
        elif recall.startswith("- "):
            assert all(line[2:] in passage for line in recall.splitlines())
            seen.add("dash")
        else:
            assert recall.endswith(".") and all(p in passage for p in recall[:-1].split("; "))
            seen.add("line")
    assert seen == {*RECALL_FORMATS, "repeat", "shuffled"}


def test_copy_exercises_share_and_determinism():
    docs = [DOC, DOC.upper()]
    n = sum(len(passages(d)) for d in docs)
    assert copy_exercises(docs, 0.0) == [] and len(copy_exercises(docs, 1.0)) == n
    some = copy_exercises(docs, 0.5, seed=3)
    assert some == copy_exercises(docs, 0.5, seed=3) and 0 < len(some) < n
    assert all(len(e) <= 2 * PASSAGE_CHARS + 2 for e in some)
    with pytest.raises(ValueError, match="copy_fraction must be in"):
        copy_exercises(docs, 1.5)


class Oracle(nn.Module):
    """Logits that put all mass on a chosen token: the true next token, or the current one."""

    def __init__(self, shift: int, vocab: int = 5000):
        super().__init__()
        self.shift, self.config = shift, SimpleNamespace(vocab_size=vocab, bos_token_id=1)
        self.unused = nn.Parameter(torch.zeros(1))  # where a model's parameters are, its inputs go

    def forward(self, ids):
        target = torch.roll(ids, -self.shift, dims=1)
        return torch.nn.functional.one_hot(target, self.config.vocab_size).float()


@pytest.mark.parametrize("length", [2, 17, 96])
def test_repeat_drill_is_pieces_written_two_or_three_times(length):
    rng = random.Random(length)
    ids = repeat_drill(rng, vocab_size=1000, length=length, low=300)
    assert len(ids) == length and all(300 <= i < 1000 for i in ids)  # no <s>: a drill is not a document
    # parse it back greedily: every piece of 4-30 ids is followed by 1 or 2 copies of itself (the last may be cut)
    rest, pieces = ids, 0
    while rest:
        n = next((n for n in range(4, 31) if rest[n:2 * n] == rest[:n]), None)
        if n is None:  # only the cut tail may fail to parse: shorter than a piece written twice
            assert len(rest) < 2 * 30
            break
        copies = 3 if rest[2 * n:3 * n] == rest[:n] else 2
        rest, pieces = rest[copies * n:], pieces + 1
    assert length < 60 or pieces >= 1
    assert repeat_drill(random.Random(length), 1000, length, 300) == ids  # seeded
    assert min(repeat_drill(rng, 100, 50)) >= 50  # a tiny vocabulary: low capped at vocab_size / 2


def test_induction_accuracy_scores_exactly_the_copyable_tokens():
    assert induction_accuracy(Oracle(shift=1)) == 1.0  # knows every next token
    assert induction_accuracy(Oracle(shift=0)) < 0.01  # repeats the current token: copies nothing
    model = tiny_model()
    model.train()
    assert induction_accuracy(model, low=10) < 0.2 and model.training  # random weights; mode restored
