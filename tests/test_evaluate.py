"""minipeft.evaluate and `minipeft eval` on a tiny random model and a tokenizer trained in the test.

Independent references: prompts are compared with template.render_prompt ids, replies with a
direct model.generate call on one unpadded prompt, the teacher-forced loss with
torch.nn.functional.cross_entropy on each example alone, and every task metric with a direct
call of minipeft.metrics (itself proven against sacrebleu and rouge-score in test_metrics.py)
plus hand-counted values. Where generation is replaced by a script of known replies, the
scripted ids include junk after the stop token, so a reply that is not cut shows.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minipeft.evaluate as ev
from minipeft import ModelConfig, Transformer, load_pretrained
from minipeft.cli import main as cli_main
from minipeft.data.formats import Example
from minipeft.data.loader import load_jsonl
from minipeft.eval_cli import register
from minipeft.evaluate import detect_lang, detect_task, evaluate, write_report
from minipeft.job import DEFAULT_MODEL
from minipeft.lora import LoraConfig
from minipeft.metrics import corpus_bleu, exact_match_accuracy, rouge
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.templates import ChatML, get_template, save_template
from minipeft.tokenizer import Tokenizer, load_tokenizer

# Replies of different lengths (so batches are left-padded), one system turn and one two-turn
# conversation (the prompt then holds a whole earlier exchange).
CONVERSATIONS = [
    [{"role": "user", "content": "what is a fox?"}, {"role": "assistant", "content": "a quick brown animal"}],
    [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "tell me about the dog"},
     {"role": "assistant", "content": "the lazy dog"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
     {"role": "user", "content": "why is the fox quick and brown and what does it jump over?"},
     {"role": "assistant", "content": "the fox jumps over a lazy dog"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好 世界"}],
    [{"role": "user", "content": "please answer the question"}, {"role": "assistant", "content": "answer"}],
]


def write_jsonl(path: Path, replies=None, conversations=CONVERSATIONS) -> Path:
    """conversations, with their final replies replaced by `replies` when given, as a messages JSONL."""
    lines = []
    for i, messages in enumerate(conversations):
        messages = [dict(m) for m in messages]
        if replies is not None:
            messages[-1]["content"] = replies[i]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_turn(replies):
    return [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": r}]
            for i, r in enumerate(replies)]


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    # N(0, 0.02) weights give top logits ~1e-3 apart; std 0.3 separates them by ~1, so float rounding
    # (padded vs unpadded attention sums, ~1e-7) cannot flip a greedy choice and equalities are exact.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


@pytest.fixture
def examples(tmp_path):
    return load_jsonl(write_jsonl(tmp_path / "test.jsonl"))


class ScriptedGenerate:
    """Stands in for minipeft.generation.generate: each prompt's row continues with a fixed id list.

    Records every call, so tests can check the batches the model would have been fed.
    """

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]):
        self.continuations, self.calls = continuations, []

    def __call__(self, model, input_ids, max_new_tokens, eos_token_id, attention_mask, pad_token_id):
        self.calls.append(dict(input_ids=input_ids.clone(), attention_mask=attention_mask.clone(),
                               eos=eos_token_id, pad=pad_token_id, max_new_tokens=max_new_tokens))
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(i for i, m in zip(ids, mask) if m)
            rows.append(ids + self.continuations[prompt][:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def script(monkeypatch, tok, template, examples, replies, stops=None):
    """Make generation answer examples[i] with replies[i] + stop + junk (stops[i] None: no stop)."""
    stop_ids = template.stop_token_ids(tok)
    stops = [stop_ids[i % len(stop_ids)] for i in range(len(replies))] if stops is None else stops
    junk = tok.encode("the quick brown fox", add_dummy_prefix=False)
    continuations = {}
    for e, reply, stop in zip(examples, replies, stops):
        ids = tok.encode(reply) + ([] if stop is None else [stop] + junk)
        continuations[tuple(template.render_prompt(e.messages[:-1], tok))] = ids
    fake = ScriptedGenerate(continuations)
    monkeypatch.setattr(ev, "generate", fake)
    return fake


# --- prompts, batching, stopping ---------------------------------------------------------------
def test_model_is_fed_render_prompt_ids_left_padded_and_replies_cut_at_stop(monkeypatch, tok, model, examples):
    template = ChatML()
    replies = ["a quick brown animal", "lazy", "the fox jumps over a lazy dog", "你好 世界", "no stop here"]
    im_end, eos = template.stop_token_ids(tok)
    fake = script(monkeypatch, tok, template, examples, replies, stops=[im_end, eos, im_end, eos, None])
    result = evaluate(model, tok, examples, template, max_new_tokens=40, batch_size=2, progress=False)

    prompts = sorted(tuple(template.render_prompt(e.messages[:-1], tok)) for e in examples)
    fed = []
    for call in fake.calls:
        assert call["eos"] == [im_end, eos] and call["pad"] == tok.pad_id and call["max_new_tokens"] == 40
        ids, mask = call["input_ids"], call["attention_mask"]
        assert ids.shape[0] <= 2
        for row, row_mask in zip(ids.tolist(), mask.tolist()):
            n_pad = row_mask.count(0)
            assert row_mask == [0] * n_pad + [1] * (len(row) - n_pad)  # left padding
            assert row[:n_pad] == [tok.pad_id] * n_pad
            fed.append(tuple(row[n_pad:]))
    assert sorted(fed) == prompts  # every prompt once, exactly render_prompt's ids
    assert result.predictions == replies
    assert result.finished == [True, True, True, True, False]
    assert result.counts["unfinished"] == 1 and result.counts["examples"] == 5


def test_batched_replies_equal_direct_generate_one_prompt_at_a_time(tok, tok_dir, model, examples):
    # A stop id the model really emits: let greedy run free on example 0 and make its 4th new token
    # eos, so one row of a padded batch stops early while the others run on.
    plain = get_template("plain")
    first = plain.render_prompt(examples[0].messages[:-1], tok)
    free = model.generate(torch.tensor([first]), 8)[0, len(first):].tolist()
    stop = free[3]
    tok2 = Tokenizer((tok_dir / "tokenizer.model").read_bytes(), eos_id=stop, special_tokens=tok.special_tokens)
    result = evaluate(model, tok2, examples, plain, max_new_tokens=8, batch_size=3, progress=False)
    for e, prediction, finished in zip(examples, result.predictions, result.finished):
        prompt = plain.render_prompt(e.messages[:-1], tok2)
        new = model.generate(torch.tensor([prompt]), 8, eos_token_id=stop)[0, len(prompt):].tolist()
        cut = new.index(stop) if stop in new else len(new)
        assert prediction == tok2.decode(new[:cut]).strip()
        assert finished == (stop in new)
    assert result.finished[0] and result.predictions[0] == tok2.decode(free[:free.index(stop)]).strip()


def test_reference_loss_equals_cross_entropy_of_each_example_alone(tok, model, examples):
    template = ChatML()
    result = evaluate(model, tok, examples, template, max_new_tokens=2, batch_size=3, progress=False)
    nll, tokens, correct = 0.0, 0, 0
    for e in examples:
        ids, labels = template.render(e.messages, tok, mode="last")
        logits = model(torch.tensor([ids]))[0, :-1]
        targets = torch.tensor(labels[1:])
        kept = targets != -100
        nll += F.cross_entropy(logits[kept], targets[kept], reduction="sum").item()
        tokens += int(kept.sum())
        correct += int((logits[kept].argmax(-1) == targets[kept]).sum())
    # Padded batches sum attention over more (masked) keys: float32 rounding, ~1e-7 relative.
    assert result.metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.metrics["token_accuracy"] == correct / tokens
    assert result.counts["reference_tokens"] == tokens


def test_model_mode_is_restored(tok, model, examples):
    model.train()
    evaluate(model, tok, examples[:1], ChatML(), max_new_tokens=1, progress=False)
    assert model.training
    model.eval()


# --- metrics per task ----------------------------------------------------------------------------
def test_generation_metrics_equal_direct_metric_calls(monkeypatch, tok, model, examples):
    replies = ["a quick brown animal", "the dog", "the fox jumps over the dog", "你好", "answer"]
    script(monkeypatch, tok, ChatML(), examples, replies)
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, lang="en", progress=False)
    refs = [e.response for e in examples]
    assert result.task == "generation" and result.lang == "en"
    assert result.metrics["exact_match"] == exact_match_accuracy(replies, refs) == 2 / 5
    assert result.metrics["bleu"] == corpus_bleu(replies, refs).score
    scores = rouge(replies, refs)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result.metrics[key] == scores[key]
    assert result.matches == [True, False, False, False, True]
    assert set(result.metrics) == {"loss", "perplexity", "token_accuracy", "exact_match", "bleu",
                                   "rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_chinese_references_use_zh_tokenization(monkeypatch, tmp_path, tok, model):
    refs = ["你好 世界", "中文 测试 模型", "微调 数据", "模型 微调"]
    replies = ["你好世界", "中文 模型", "数据", "hello"]
    examples = load_jsonl(write_jsonl(tmp_path / "zh.jsonl", conversations=one_turn(refs)))
    script(monkeypatch, tok, ChatML(), examples, replies)
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, progress=False)
    assert result.lang == "zh" and result.task == "generation"
    assert result.metrics["bleu"] == corpus_bleu(replies, refs, tokenize="zh").score
    assert result.metrics["bleu"] != corpus_bleu(replies, refs).score  # 13a sees whole words: a real choice
    assert result.metrics["rouge1"] == rouge(replies, refs, lang="zh")["rouge1"] > 0
    assert rouge(replies, refs, lang="en")["rouge1"] == 0  # English tokenization would drop every character


def test_json_task_metrics(monkeypatch, tmp_path, tok, model):
    refs = ['{"name": "fox", "age": 3}', '{"a": 1, "b": [1, 2]}', '{"k": "v"}', '{"x": true}']
    # key order ignored (match) / valid object missing "b" / not JSON / JSON, but not an object
    replies = ['{"age": 3, "name": "fox"}', '{"a": 1}', "not json", "[1, 2]"]
    examples = load_jsonl(write_jsonl(tmp_path / "json.jsonl", conversations=one_turn(refs)))
    script(monkeypatch, tok, ChatML(), examples, replies)
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, progress=False)
    assert result.task == "json"
    assert result.metrics["exact_match"] == exact_match_accuracy(replies, refs) == 1 / 4
    assert result.metrics["valid_json_rate"] == 2 / 4
    assert result.metrics["required_fields_present"] == 1 / 4
    assert "bleu" not in result.metrics


def test_json_task_counts_nan_and_infinity_as_invalid_json():
    """Python's json.loads reads NaN/Infinity, JSON's grammar (RFC 8259) has neither: such a reply is
    not the strict JSON the json task asks for, nor an object holding the required fields."""
    ref = '{"name": "Anna Berg", "age": 74, "city": "Manila"}'
    replies = ['{"name": "Anna Berg", "age": NaN, "city": "Manila"}',
               '{"name": "Anna Berg", "age": -Infinity, "city": "Manila"}', ref]
    metrics = ev.task_metrics("json", replies, [ref] * 3, "en")
    assert metrics == {"exact_match": 1 / 3, "valid_json_rate": 1 / 3, "required_fields_present": 1 / 3}
    assert detect_task(['{"a": NaN}', '{"a": 1}']) == "generation"  # a reference with NaN is not JSON either


def test_json_task_counts_a_key_given_twice_as_invalid_json():
    """json.loads keeps the last of a repeated key (other parsers the first, or refuse), so
    '{"name": "X", "name": "Anna Berg", ...}' counted as an exact match of the reference."""
    ref = '{"name": "Anna Berg", "age": 74}'
    twice = '{"name": "X", "name": "Anna Berg", "age": 74}'
    assert ev.task_metrics("json", [twice, ref], [ref] * 2, "en") == {
        "exact_match": 0.5, "valid_json_rate": 0.5, "required_fields_present": 0.5}
    assert exact_match_accuracy(['{"b": 2, "a": 1}', twice], ['{"a": 1, "b": 2}', twice]) == 1.0  # text alike


def test_classification_task_metrics(monkeypatch, tmp_path, tok, model):
    refs = ["positive", "negative", "positive", "neutral", "negative"]
    replies = ["positive", "positive", "Positive", "neutral", "I think negative"]
    examples = load_jsonl(write_jsonl(tmp_path / "cls.jsonl", conversations=one_turn(refs)))
    script(monkeypatch, tok, ChatML(), examples, replies)
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, progress=False)
    assert result.task == "classification"
    assert result.metrics["accuracy"] == exact_match_accuracy(replies, refs) == 2 / 5  # case counts
    assert result.metrics["invalid_label_rate"] == 2 / 5  # "Positive" and "I think negative"
    assert "exact_match" not in result.metrics and "bleu" not in result.metrics


def test_task_given_overrides_detection(monkeypatch, tok, model, examples):
    script(monkeypatch, tok, ChatML(), examples, [e.response for e in examples])
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, task="classification", progress=False)
    assert result.task == "classification" and result.metrics["accuracy"] == 1.0


@pytest.mark.parametrize("refs, task", [
    (['{"a": 1}', '{"b": [2]}'], "json"),
    (['{"a": 1}', "[1, 2]"], "generation"),  # an array is not an object
    (['{"a": 1}', "yes", "yes"], "classification"),
    (["yes", "no", "yes"], "classification"),
    (["very good indeed", " very  good indeed", "bad"], "classification"),  # 3 words, normalized repeat
    (["very good indeed!", "good", "good", "a four word label"], "generation"),  # one label > 3 words
    (["Paris", "1889", "Einstein"], "generation"),  # unique short answers: QA, not labels
    ([f"label{i}" for i in range(21)] * 2, "generation"),  # 21 distinct labels > 20
    ([f"label{i}" for i in range(20)] * 2, "classification"),
    (["42"], "generation"),
    (["正面", "负面", "非常满意", "正面"], "classification"),  # Chinese labels: a few characters
    (["今天天气很好，我们去公园散步吧。"] * 2 + ["明天会下雨，记得带伞出门。"], "generation"),  # sentences, no spaces
])
def test_detect_task(refs, task):
    assert detect_task(refs) == task


def test_detect_lang():
    assert detect_lang(["你好 world", "中文", "english"]) == "zh"
    assert detect_lang(["你好 world", "english", "more english"]) == "zh"  # a minority of Chinese replies
    assert detect_lang(["ありがとう", "こんにちは"]) == "zh"  # kana: no spaces between words either
    assert detect_lang(["english", "café, naïve"]) == "en"  # accented Latin: rouge-score's tokens
    assert detect_lang(["english", "Привет, мир"]) == detect_lang(["안녕하세요"]) == detect_lang(["Γειά"]) == "intl"
    assert detect_lang(["Привет", "模型"]) == "zh"  # CJK decides BLEU's tokenizer


def test_rouge_stemmer_compares_stems():
    refs, replies = ["the model runs quickly"], ["the models running quickly"]
    plain, stemmed = (ev.task_metrics("generation", replies, refs, "en", stem) for stem in (False, True))
    assert plain["rouge1"] == pytest.approx(0.5) and stemmed["rouge1"] == 1.0
    assert stemmed["rouge1"] == rouge(replies, refs, use_stemmer=True)["rouge1"]


def test_replies_in_other_scripts_score_as_words():
    """rouge-score's tokenizer (lang="en") deletes Cyrillic or Hangul: identical replies scored 0."""
    refs = ["Привет, мир!", "Модель работает хорошо.", "안녕하세요 세계"]
    metrics = ev.task_metrics("generation", refs, refs, detect_lang(refs))
    assert metrics["rouge1"] == metrics["rouge2"] == metrics["rougeL"] == metrics["rougeLsum"] == 1.0
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["exact_match"] == 1.0
    assert ev.task_metrics("generation", refs, refs, "en")["rouge1"] == 0.0
    # BLEU with sacrebleu's international tokenizer: "«Да»," is three tokens there, one under 13a
    replies, refs = ["«Да», сказал он"], ["«Да» — сказал он"]
    assert ev.task_metrics("generation", replies, refs, "intl")["bleu"] == corpus_bleu(replies, refs, tokenize="intl").score
    assert corpus_bleu(replies, refs, tokenize="intl").score != corpus_bleu(replies, refs).score


def test_mixed_language_references_score_perfect_predictions_as_perfect():
    """A bilingual test set (here a minority of Chinese and Japanese replies): "en" tokenization
    drops every CJK character (rouge-score's default), so identical replies were scored on what
    ASCII they hold, or not at all (rouge1 0.8, rouge2 0.6 here); "zh" scores English as "en" does."""
    english = ["The weather is nice today.", "We fine-tuned the model with LoRA.", "It works well."]
    cjk = ["我们用LoRA微调了模型。", "ありがとうございます"]
    refs = english + cjk
    metrics = ev.task_metrics("generation", refs, refs, detect_lang(refs))
    assert metrics["exact_match"] == 1.0 and metrics["bleu"] == pytest.approx(100.0)
    assert metrics["rouge1"] == metrics["rouge2"] == metrics["rougeL"] == 1.0
    assert rouge(english[:2], english[1:], lang="zh") == rouge(english[:2], english[1:], lang="en")


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="summarization"), "task='summarization'"),
    (dict(lang="fr"), "lang='fr'"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments(tok, model, examples, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(model, tok, examples, ChatML(), progress=False, **kwargs)


def test_an_example_that_cannot_render_names_its_file_and_line(tok, model, examples):
    broken = Example("made.jsonl", 7, [{"role": "user", "content": "hi"}], {}, "messages")  # no reply
    with pytest.raises(ValueError, match=r"^made\.jsonl:7: messages is empty"):
        evaluate(model, tok, [*examples, broken], ChatML(), progress=False)


def test_tokenizer_larger_than_model_vocabulary_is_refused(tok, examples):
    with pytest.raises(ValueError, match="do not belong together"):
        evaluate(tiny_model(tok.vocab_size - 1), tok, examples, ChatML(), progress=False)


# --- report files --------------------------------------------------------------------------------
def test_write_report(monkeypatch, tmp_path, tok, model):
    refs = [f"reply number {i} the fox" for i in range(12)]
    replies = list(refs[:6]) + ["```code``` fences ```` inside"] + [f"wrong {i}" for i in range(5)]
    examples = load_jsonl(write_jsonl(tmp_path / "t.jsonl", conversations=one_turn(refs)))
    script(monkeypatch, tok, ChatML(), examples, replies)
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, progress=False)
    sources = {"model": "m", "adapter": None, "data": "t.jsonl"}
    out = tmp_path / "out"
    write_report(result, out, samples=5, seed=0, sources=sources)
    assert sorted(os.listdir(out)) == ["metrics.json", "samples.md"]  # no temporary file left behind
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert report["metrics"] == result.metrics and report["counts"] == result.counts
    assert (report["task"], report["model"], report["adapter"], report["data"]) == ("generation", "m", None, "t.jsonl")
    assert report["template"] == {"name": "chatml", "default_system": "You are a helpful assistant."}
    first = (out / "samples.md").read_text(encoding="utf-8")
    assert first.count("\n## ") == 5 and first.count("Verdict:") == 5

    write_report(result, out, samples=5, seed=0, sources=sources)
    assert (out / "samples.md").read_text(encoding="utf-8") == first  # seeded
    write_report(result, out, samples=5, seed=1, sources=sources)
    assert (out / "samples.md").read_text(encoding="utf-8") != first

    write_report(result, out, samples=100, seed=0)
    every = (out / "samples.md").read_text(encoding="utf-8")
    assert every.count("\n## ") == 12 and "12 of 12" in every
    assert "`````text\n```code``` fences ```` inside\n`````" in every  # a fence nothing inside can close
    assert "exact match yes" in every and "exact match no" in every


def test_infinite_perplexity_is_written_as_null(monkeypatch, tmp_path, tok, model, examples):
    script(monkeypatch, tok, ChatML(), examples, [e.response for e in examples])
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, progress=False)
    result.metrics["perplexity"] = math.inf
    write_report(result, tmp_path, samples=1)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["perplexity"] is None


def test_a_report_cut_short_leaves_the_previous_pair(monkeypatch, tmp_path, tok, model, examples):
    """metrics.json and samples.md are swapped in together: a crash before the second was written
    left the new metrics beside the old samples."""
    script(monkeypatch, tok, ChatML(), examples, [e.response for e in examples])
    result = evaluate(model, tok, examples, ChatML(), max_new_tokens=64, progress=False)
    write_report(result, tmp_path / "out", samples=1, seed=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("minipeft.evaluate._samples_markdown", crash)
    result.metrics["loss"] += 1.0
    with pytest.raises(KeyboardInterrupt):
        write_report(result, tmp_path / "out", samples=1, seed=0)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


# --- command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    directory = tmp_path_factory.mktemp("eval_model") / "model"
    tiny_model(tok.vocab_size).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def run_register(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_cli_through_register(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "test.jsonl")
    out = tmp_path / "out"
    assert run_register(["--model", str(model_dir), "--data", str(data), "--output", str(out),
                         "--max-new-tokens", "4", "--samples", "2", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "template plain from default" in printed and "loss" in printed and "bleu" in printed
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert report["template"]["name"] == "plain" and report["counts"]["examples"] == 5
    assert report["data"] == str(data) and report["max_new_tokens"] == 4 and report["rouge_stemmer"] is False
    assert (out / "samples.md").read_text(encoding="utf-8").count("\n## ") == 2
    assert run_register(["--model", str(model_dir), "--data", str(data), "--output", str(out), "--task", "generation",
                         "--max-new-tokens", "4", "--rouge-stemmer"]) == 0
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["rouge_stemmer"] is True


def test_cli_errors_are_one_line(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "test.jsonl")
    assert cli_main(["eval", "--model", str(tmp_path / "nowhere"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minipeft eval: error:") and "nowhere" in err and "\n" not in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"instruction": "hi"}\n', encoding="utf-8")
    assert cli_main(["eval", "--model", str(model_dir), "--data", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err  # names the file and line

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", "--model", str(model_dir), "--data", str(data), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err


def test_cli_adapter_round_trip_in_subprocess(tmp_path, tok, model_dir):
    adapter_dir = tmp_path / "adapter"
    torch.manual_seed(1)
    # init_lora_weights=False: random B, so the adapter changes the model (a zero B would be a no-op).
    peft = get_peft_model(load_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    peft.save_pretrained(adapter_dir)
    template = ChatML(default_system=None)
    save_template(adapter_dir, template)
    data = write_jsonl(tmp_path / "test.jsonl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "minipeft", "eval", "--model", str(model_dir), "--adapter", str(adapter_dir),
           "--data", str(data), "--output", str(out), "--max-new-tokens", "6", "--samples", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"template chatml from {adapter_dir / 'chat_template.json'}" in proc.stdout
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert report["adapter"] == str(adapter_dir) and report["template"] == template.to_dict()

    examples = load_jsonl(data)
    reloaded = PeftModel.from_pretrained(load_pretrained(model_dir), adapter_dir)
    expected = evaluate(reloaded, tok, examples, template, max_new_tokens=6, progress=False)
    base = evaluate(load_pretrained(model_dir), tok, examples, template, max_new_tokens=6, progress=False)
    # Same code on the same weights in another process: only thread-count rounding may differ.
    for key, value in expected.metrics.items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-6), key
    assert report["metrics"]["loss"] != pytest.approx(base.metrics["loss"], rel=1e-3)  # the adapter was applied
    samples = (out / "samples.md").read_text(encoding="utf-8")
    assert samples.count("\n## ") == 3


def test_the_readme_eval_command_defaults_to_the_shipped_model(tmp_path, monkeypatch, capsys):
    """README's `minipeft eval` line, run as written (DIR: an adapter of the shipped model; plus
    --max-new-tokens 4, for speed): with no --model it evaluates the shipped base model + the
    adapter; the loss equals evaluate()'s on them."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    command = next(line.split("`")[1] for line in readme.read_text(encoding="utf-8").splitlines()
                   if line.startswith("| `minipeft eval "))
    torch.manual_seed(2)
    peft = get_peft_model(load_pretrained(DEFAULT_MODEL), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    write_jsonl(tmp_path / "test.jsonl", conversations=CONVERSATIONS[:2])
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / "adapter") if word == "DIR" else word for word in shlex.split(command)]
    assert argv[0] == "minipeft" and "--model" not in argv
    assert cli_main(argv[1:] + ["--max-new-tokens", "4"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval_results" / "metrics.json").read_text(encoding="utf-8"))
    assert report["model"] == str(DEFAULT_MODEL)
    examples = load_jsonl(tmp_path / "test.jsonl")
    reloaded = PeftModel.from_pretrained(load_pretrained(DEFAULT_MODEL), tmp_path / "adapter")
    expected = evaluate(reloaded, load_tokenizer(DEFAULT_MODEL), examples, get_template("plain"), max_new_tokens=1,
                        progress=False)
    assert report["metrics"]["loss"] == pytest.approx(expected.metrics["loss"], rel=1e-6)  # loss: teacher-forced


def test_replies_stop_at_the_models_context():
    """max_new_tokens far past the context used to generate on (minutes, garbage past the trained
    positions): replies stop where the batch's longest prompt + reply fills max_position_embeddings,
    and a prompt that fills it alone is an error, not an empty reply."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    replies = ev.generate_replies(model, [[1] * 10, [1] * 7], stop_ids=[], pad_id=0, max_new_tokens=10 ** 5,
                                  batch_size=2, progress=False)
    assert [len(ids) for ids, _ in replies] == [6, 6] and not any(done for _, done in replies)
    with pytest.raises(ValueError, match="a prompt of 16 tokens fills the model's context of 16 tokens"):
        ev.generate_replies(model, [[1] * 16], stop_ids=[], pad_id=0, max_new_tokens=1, batch_size=1, progress=False)


def test_a_prompt_past_the_context_is_named_by_its_line(tok, examples):
    """The error named no example (generate_replies sees a sorted batch): evaluate names file and
    line before generating anything."""
    prompts = [len(ChatML().render_prompt(e.messages[:-1], tok)) for e in examples]
    longest = max(range(len(prompts)), key=prompts.__getitem__)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=prompts[longest]))
    line = examples[longest].line
    with pytest.raises(ValueError, match=rf"test.jsonl:{line}: a prompt of {prompts[longest]} tokens fills the "
                                         rf"model's context of {prompts[longest]} tokens"):
        evaluate(model, tok, examples, ChatML(), max_new_tokens=1, progress=False)
