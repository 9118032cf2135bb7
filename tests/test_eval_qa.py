"""QA findings on minipeft.evaluate and minipeft.metrics (BLEU, exact match), each against a reference:
sacrebleu for BLEU, and exact_match itself (the definition of a match) for the classification labels."""
import random

import pytest
import sacrebleu

import minipeft.evaluate as ev
from minipeft.metrics import corpus_bleu, exact_match, exact_match_accuracy
from minipeft.metrics.exact_match_metric import AnswerSet


# --- classification: invalid_label_rate must agree with the (JSON-aware) accuracy -------------------
def test_a_correct_multi_label_prediction_is_not_an_invalid_label():
    """Multi-label classification writes labels as JSON arrays. accuracy compares them as JSON data
    (exact_match), so '["sports","politics"]' matched its reference '["sports", "politics"]', while
    invalid_label_rate compared whitespace-normalized text and called the same prediction a label
    that no reference holds: accuracy 1/2 and invalid_label_rate 3/4 summed past 1."""
    refs = ['["sports", "politics"]', '["sports"]', '["sports"]', '["politics"]']
    preds = ['["sports","politics"]', '["sports"]', '[ "politics" ]', "sports"]
    assert ev.detect_task(refs) == "classification"
    metrics = ev.task_metrics("classification", preds, refs, "en")
    assert metrics["accuracy"] == exact_match_accuracy(preds, refs) == 2 / 4
    # invalid: a prediction that matches (exact_match) none of the labels: only "sports"
    assert metrics["invalid_label_rate"] == sum(not any(exact_match(p, r) for r in refs) for p in preds) / 4 == 1 / 4


def test_answer_set_membership_is_any_exact_match():
    """AnswerSet(labels) answers `p in labels` as any(exact_match(p, label)), in O(1) per prediction;
    checked on a pool of JSON, near-JSON and text strings (whitespace inside JSON strings, a key twice,
    scalars, case) under every option."""
    pool = ['["a", "b"]', '["a","b"]', '[ "a" , "b" ]', '["b", "a"]', '["a  b"]', '["a b"]', '["a\tb"]',
            '{"k": 1}', '{"k":1.0}', '{"k": 1, "k": 1}', '{"K": 1}', "42", " 42 ", "true", "True", "yes",
            "Yes ", "YES", "no", "a  b", "a b", "", "[1,", "[1]", "[ 1 ]", "NaN", '{"k": NaN}']
    rng = random.Random(0)
    for ignore_case in (False, True):
        for compare_json in (False, True):
            for _ in range(200):
                labels = rng.sample(pool, rng.randint(1, 6))
                answers = AnswerSet(labels, ignore_case=ignore_case, compare_json=compare_json)
                for p in pool:
                    expected = any(exact_match(p, label, ignore_case, compare_json) for label in labels)
                    assert (p in answers) == expected, (p, labels, ignore_case, compare_json)


# --- JSON: a number beyond a double's range --------------------------------------------------------
def test_numbers_beyond_a_double_are_not_json_data():
    """json.loads reads 1e400 and 2e400 both as float('inf'), so two different replies "exactly
    matched" and a reply holding the value parse_json refuses as the literal Infinity counted as
    valid JSON."""
    assert not exact_match('{"age": 1e400}', '{"age": 2e400}')
    assert exact_match('{"age": 1e400}', '{"age": 1e400}')  # still equal as text
    ref = '{"age": 74}'
    metrics = ev.task_metrics("json", ['{"age": -1e999}', ref], [ref, ref], "en")
    assert metrics == {"exact_match": 0.5, "valid_json_rate": 0.5, "required_fields_present": 0.5}
    assert exact_match('{"a": 1e308}', '{"a": 1E+308}') and exact_match('{"a": 1e-400}', '{"a": 0.0}')  # in range


def test_fenced_json_is_not_valid_json():
    """Models often wrap JSON in a Markdown code fence; the json task scores the reply as written
    (module docstring): a fenced object is neither valid JSON nor an exact match."""
    ref = '{"name": "Anna"}'
    fenced = f"```json\n{ref}\n```"
    assert ev.task_metrics("json", [fenced], [ref], "en") == {
        "exact_match": 0.0, "valid_json_rate": 0.0, "required_fields_present": 0.0}


# --- BLEU: sacrebleu's BLEUScore also has `ratio`, and prints it --------------------------------
@pytest.mark.parametrize("hyps, refs", [
    (["the cat sat on the mat today", "a"], ["the cat sat on a mat", "a b"]),
    (["short"], ["a much longer reference sentence"]),
    ([""], [""]),  # ref_len 0: sacrebleu's ratio is 0
])
def test_bleu_score_ratio_and_str_equal_sacrebleu(hyps, refs):
    ours, theirs = corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, [refs])
    assert ours.ratio == theirs.ratio
    assert str(ours) == str(theirs)
