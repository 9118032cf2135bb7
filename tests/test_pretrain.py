"""minipeft.pretrain: HTML -> text, corpus files, the held-out split, windows, a tiny end-to-end run,
and the shipped base model models/minillama-10m against transformers and its model card."""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minipeft import ModelConfig, Transformer, load_pretrained
from minipeft import pretrain as pretrain_module
from minipeft.cli import main
from minipeft.metrics import causal_lm_loss
from minipeft.corpus import build_corpus, html_to_text, read_corpus, write_corpus
from minipeft.exercises import copy_exercises, induction_accuracy
from minipeft.pretrain import (PretrainConfig, make_windows, pretrain, schedule_windows, split_documents, spread,
                               steps_for_budget, token_stream)
from minipeft.tokenizer import load_tokenizer, train_tokenizer
from minipeft.trainer import read_metrics

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "minillama-10m"
PATH_FLAGS = ("--corpus", "--html-dir", "--output", "--init")  # where a run read and wrote, not how


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on cores shared with other jobs: one torch thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

PAGE = """<!DOCTYPE html><html><head><title>Skip me</title><style>p {color: red}</style>
<script>var skip = "me";</script></head><body>
<nav><a href="/">Home</a> | <a href="/next">Next</a></nav>
<div class="sphinxsidebar" role="navigation"><h3>Table of Contents</h3><ul><li>sidebar item</li></ul></div>
<div class="body" role="main">
<h1>json &mdash; JSON encoder<a class="headerlink" href="#json">¶</a></h1>
<p>Encoding   basic <code>Python</code>
objects:<p>An unclosed paragraph with &quot;quotes&quot; &amp; entities.
<div class="toctree-wrapper"><ul><li><a href="a.html">Linked chapter</a></li></ul></div>
<ul><li>first item</li><li>second <em>item</em></li></ul>
<div class="highlight"><pre><span class="gp">&gt;&gt;&gt; </span>json.dumps({<span class="s2">"a"</span>: [1, 2]})
'{"a": [1, 2]}'

&gt;&gt;&gt; def f(x):
...     return x
</pre></div>
<table><tr><th>Option</th><th>Meaning</th></tr><tr><td>'&lt;'</td><td>left</td></tr></table>
</div>
<div class="footer">Copyright footer</div></body></html>"""

EXPECTED = """json — JSON encoder

Encoding basic Python objects:

An unclosed paragraph with "quotes" & entities.

first item

second item

>>> json.dumps({"a": [1, 2]})
'{"a": [1, 2]}'

>>> def f(x):
...     return x

Option

Meaning

'<'

left"""


# --- corpus --------------------------------------------------------------------------------------
def test_html_to_text_keeps_the_reading_text_and_code():
    assert html_to_text(PAGE) == EXPECTED


def test_html_without_a_main_region_keeps_the_body():
    html = "<html><body><nav>menu</nav><p>One\nparagraph.</p><pre>  indented\n</pre><script>x</script></body></html>"
    assert html_to_text(html) == "One paragraph.\n\n  indented"


def test_build_corpus_is_sorted_deterministic_and_skips_index_pages(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "page.html").write_text("<p>second</p>", encoding="utf-8")
    (tmp_path / "a.html").write_text("<p>first</p>", encoding="utf-8")
    (tmp_path / "genindex-A.html").write_text("<p>index</p>", encoding="utf-8")
    (tmp_path / "empty.html").write_text("<script>only code</script>", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not html", encoding="utf-8")
    assert build_corpus(tmp_path) == ["first", "second"] == build_corpus(tmp_path)
    with pytest.raises(ValueError, match="no \\*.html page with text"):
        build_corpus(tmp_path, exclude=("*.html",))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_corpus(tmp_path / "missing")


def test_corpus_file_round_trip(tmp_path):
    docs = ["first doc\n\nwith paragraphs", "code:\n\n    x = {'a': 1}\n", "unicode é ✓"]
    write_corpus(docs, tmp_path / "c.txt")
    assert read_corpus(tmp_path / "c.txt") == [d.strip("\n") for d in docs]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.txt'}: not valid UTF-8 (invalid start byte at "
                                                   "byte 3)")):
        read_corpus(tmp_path / "bad.txt")
    (tmp_path / "blank.txt").write_text("\n\f\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "blank.txt")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_corpus(tmp_path / "none.txt")



def test_html_pages_with_cr_line_endings_and_a_page_not_utf8(tmp_path):
    """build_corpus read pages with Python's newline translation and its own copy of the UTF-8 check; it reads
    them as read_corpus does now (files.read_text), and html_to_text takes CR and CR LF in <pre> as newlines,
    as an HTML parser does, whether the page came from a file or a string."""
    (tmp_path / "mac.html").write_bytes(b"<p>old\rMac</p><pre>a\r  b\r\n  c\r</pre>")
    assert html_to_text("<pre>a\r  b\r\n  c\r</pre>") == "a\n  b\n  c"
    assert build_corpus(tmp_path) == ["old Mac\n\na\n  b\n  c"]
    (tmp_path / "z.html").write_bytes(b"<p>caf\xe9</p>")  # Latin-1
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'z.html'}: not valid UTF-8 (invalid continuation "
                                                   "byte at byte 6)")):
        build_corpus(tmp_path)

# --- split and windows -----------------------------------------------------------------------------
def test_split_holds_out_whole_documents_until_the_fraction():
    docs = [f"document {i} " * (i + 1) for i in range(20)]
    train, held = split_documents(docs, 0.2, seed=3)
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert train == [d for d in docs if d in train] and held == [d for d in docs if d in held]  # corpus order
    total = sum(map(len, docs))
    assert sum(map(len, held)) >= 0.2 * total
    # minimal: without the last document drawn the held-out part would be below the fraction
    assert min(sum(map(len, held)) - len(d) for d in held) < 0.2 * total
    assert split_documents(docs, 0.2, seed=3) == (train, held)
    assert split_documents(docs, 0.2, seed=4) != (train, held)
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="holds out all 1 documents"):
        split_documents(["only one"], 0.5)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_documents(docs, 1.0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    text = d / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n{\"name\": \"Ada\", \"age\": 36}\n" * 50)
    train_tokenizer([text], d, vocab_size=300)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_token_stream_frames_each_document(tok):
    docs = ["Hello world.", "{\"a\": 1}\nline two"]
    assert token_stream(docs, tok) == [1, *tok.encode(docs[0]), 2, 1, *tok.encode(docs[1]), 2]


def test_windows_tile_the_stream_and_drop_the_tail():
    stream = list(range(23))
    windows = make_windows(stream, 5)
    assert [len(w) for w in windows] == [5] * 4
    assert sum(windows, []) == stream[:20]
    assert make_windows(stream, 24) == []
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        make_windows(stream, 1)


def test_schedule_windows_is_a_sequence_of_epochs():
    windows = [[i, i] for i in range(7)]
    out = schedule_windows(windows, 17, seed=1)
    assert len(out) == 17
    assert sorted(map(tuple, out[:7])) == sorted(map(tuple, out[7:14])) == [(i, i) for i in range(7)]
    assert out[:7] != windows or out[7:14] != windows  # shuffled
    assert schedule_windows(windows, 17, seed=1) == out


def test_spread_samples_evenly():
    windows = [[i] for i in range(10)]
    assert spread(windows, 4) == [[0], [2], [5], [7]]
    assert spread(windows, 10) == windows == spread(windows, 0)


def test_steps_for_budget_leaves_time_for_evaluation():
    cfg = PretrainConfig(batch_size=8, eval_windows=32, evaluations=10)
    # 11 evaluations x 4 eval batches x (2 s / 3) = 29.33 s of the 600 s budget go to evaluation
    assert steps_for_budget(cfg, 2.0, 10) == int((600 - 11 * 4 * 2 / 3) / 2)
    with pytest.raises(ValueError, match="no step fits"):
        steps_for_budget(cfg, 100.0, 1)


# --- a tiny run end to end -------------------------------------------------------------------------
TINY_ARGS = ["--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2",
             "--num-attention-heads", "4", "--num-key-value-heads", "2", "--context-length", "32",
             "--batch-size", "4", "--eval-fraction", "0.25", "--eval-windows", "8", "--evaluations", "2",
             "--learning-rate", "0.01"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    pages = d / "html"
    pages.mkdir()
    for i in range(8):
        body = "".join(f"<p>Section {i}.{k}: the function returns a dict such as {{'key': {k}, 'name': 'x{i}'}}.</p>"
                       f"<pre>&gt;&gt;&gt; f({k})\n{{'key': {k}}}</pre>" for k in range(12))
        (pages / f"page{i}.html").write_text(f"<html><body><div role='main'>{body}</div></body></html>")
    out = d / "model"
    assert main(["pretrain", "--html-dir", str(pages), "--output", str(out), "--steps", "30",
                 "--save-corpus", str(d / "corpus.txt"), *TINY_ARGS]) == 0
    return d, out


def test_tiny_run_writes_a_loadable_directory_that_learned(tiny_run):
    d, out = tiny_run
    results = json.loads((out / "pretrain_results.json").read_text())
    assert results["steps"] == 30 and results["tokens_seen"] == 30 * 4 * 32
    model, tok = load_pretrained(out), load_tokenizer(out)
    assert model.config.vocab_size == tok.vocab_size == 300 and model.config.tie_word_embeddings
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 3)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    # The saved weights are the trained ones: the held-out loss recomputed from the directory
    # equals the one the run reported (same windows and float32 maths; only the batching differs,
    # which moves the mean loss by float rounding, ~1e-6).
    _, held = split_documents(read_corpus(d / "corpus.txt"), 0.25, seed=0)
    ids = torch.tensor(spread(make_windows(token_stream(held, tok), 32), 8))
    with torch.no_grad():
        loss = causal_lm_loss(model(ids), ids).item()
    assert loss == pytest.approx(results["eval_loss"], abs=1e-4)
    assert loss < math.log(300) - 1  # well below the uniform guess: it learned the repetitive pages


def test_epochs_set_the_step_count(tiny_run, tmp_path):
    d, _ = tiny_run
    assert main(["pretrain", "--corpus", str(d / "corpus.txt"), "--output", str(tmp_path / "m"), "--epochs", "0.5",
                 *TINY_ARGS]) == 0
    r = json.loads((tmp_path / "m" / "pretrain_results.json").read_text())
    assert r["steps"] == math.ceil(0.5 * r["train_windows"] / 4)


def test_epochs_count_passes_over_the_text_when_drills_are_mixed_in(tiny_run, tmp_path):
    d, _ = tiny_run
    args = ["pretrain", "--corpus", str(d / "corpus.txt"), "--epochs", "1", "--drill-fraction", "0.5", *TINY_ARGS]
    assert main([*args, "--output", str(tmp_path / "m")]) == 0
    r = json.loads((tmp_path / "m" / "pretrain_results.json").read_text())
    assert r["steps"] == math.ceil(r["train_windows"] / 2) and 1 <= r["epochs"] < 1 + 2 / r["train_windows"]
    with pytest.raises(ValueError, match="--drill-fraction 1 does not train on"):
        pretrain(read_corpus(d / "corpus.txt"), tmp_path / "n", PretrainConfig(drill_fraction=1.0), epochs=1)


def test_max_minutes_picks_the_steps_that_fit(tiny_run, tmp_path, monkeypatch):
    d, _ = tiny_run
    cfg = PretrainConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, context_length=32, batch_size=4,
                         eval_fraction=0.25, eval_windows=8, evaluations=2)
    monkeypatch.setattr(pretrain_module, "seconds_per_step", lambda *args: 0.5)  # a machine of known speed
    logs: list[str] = []
    r = pretrain(read_corpus(d / "corpus.txt"), tmp_path / "m", cfg, max_minutes=0.1, log=logs.append)
    # 6 s: 3 evaluations x 2 eval batches x 0.5 s / 3 = 1 s of evaluation, then 10 steps of 0.5 s
    assert r["steps"] == r["config"]["steps"] == steps_for_budget(cfg, 0.5, 0.1) == 10
    assert logs[-1] == "0.50s per step: 10 steps fit 0.1 minutes"
    with pytest.raises(ValueError, match="epochs or max_minutes"):
        pretrain(["text"], tmp_path / "n", cfg, epochs=1, max_minutes=1)


def test_init_continues_the_given_model(tiny_run, tmp_path):
    """--init: the weights, architecture and tokenizer of an existing model are the starting point
    (a near-zero learning rate leaves them in place; the architecture flags given are overridden)."""
    d, out = tiny_run
    cont = tmp_path / "cont"
    assert main(["pretrain", "--corpus", str(d / "corpus.txt"), "--output", str(cont), "--init", str(out),
                 "--steps", "2", *TINY_ARGS, "--hidden-size", "64", "--learning-rate", "1e-9"]) == 0
    start, after = load_pretrained(out), load_pretrained(cont)
    assert after.config == start.config
    assert (cont / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    for (name, a), b in zip(start.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    results, parent = (json.loads((m / "pretrain_results.json").read_text()) for m in (cont, out))
    assert results["config"]["hidden_size"] == 32
    # the lineage: the continued model's results are recorded, and phases() lists both runs in order
    assert results["init"] == {"model": str(out), "results": parent} and parent["init"] is None
    assert pretrain_module.phases(results) == [parent, results]
    assert [r["steps"] for r in pretrain_module.phases(results)] == [30, 2]


def test_a_run_cut_short_leaves_the_model_it_would_replace_as_it_was(tiny_run, tmp_path, monkeypatch, capsys):
    """The card's recipe writes into an existing model directory (--output models/minillama-10m).
    A run that stops early (it diverged, a crash, Ctrl-C: hours in) must leave that model whole:
    the run wrote into it as it went, first a new tokenizer, then a metrics.jsonl emptied and
    refilled, and stopped, the old weights sat beside a tokenizer they were not trained with.
    A run that completes replaces the model and keeps the other files (the card)."""
    from minipeft.trainer import Trainer, TrainingDiverged

    d, out = tiny_run
    target = tmp_path / "model"
    shutil.copytree(out, target)
    (target / "README.md").write_text("the card")

    def files():
        return {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    before, real_step = files(), Trainer.train_step

    def diverges_at_step_2(self, batch):
        if self.step == 1:
            raise TrainingDiverged("loss became nan at step 2")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", diverges_at_step_2)
    args = ["pretrain", "--corpus", str(d / "corpus.txt"), "--output", str(target), "--steps", "3", *TINY_ARGS,
            "--vocab-size", "320"]  # another tokenizer than the model's
    assert main(args) == 2 and "loss became nan" in capsys.readouterr().err
    assert files() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.failed"]  # no staging left behind
    assert [r["step"] for r in read_metrics(tmp_path / "model.failed" / "metrics.jsonl") if "loss" in r] == [1]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(args) == 0
    assert load_tokenizer(target).vocab_size == load_pretrained(target).config.vocab_size == 320
    assert (target / "README.md").read_text() == "the card"
    assert json.loads((target / "pretrain_results.json").read_text())["steps"] == 3


def test_copy_fraction_adds_exercises_from_training_documents_only(tiny_run, tmp_path):
    d, out = tiny_run
    docs = read_corpus(d / "corpus.txt")
    cfg = PretrainConfig(context_length=32, eval_fraction=0.25, batch_size=4, copy_fraction=0.5)
    plain = pretrain_module.prepare(docs, tmp_path / "a", replace(cfg, copy_fraction=0.0), tokenizer_dir=out)
    mixed = pretrain_module.prepare(docs, tmp_path / "b", cfg, tokenizer_dir=out)
    train_docs, _ = split_documents(docs, 0.25, seed=0)
    assert plain.exercises == 0 and mixed.exercises == len(copy_exercises(train_docs, 0.5, 0, max_chars=48)) > 0
    assert len(mixed.windows) > len(plain.windows) and mixed.held_out == plain.held_out  # held-out untouched


def test_drill_fraction_mixes_fresh_drills_into_the_schedule():
    windows = make_windows(list(range(300, 1000)), 32)  # 21 text windows
    cfg = PretrainConfig(context_length=32, batch_size=4, steps=10)
    # no drills: exactly the epoch-by-epoch schedule, as before drills existed
    assert pretrain_module.training_windows(windows, cfg, 1000, 1) == (schedule_windows(windows, 40, 0), 0)
    mixed, n_drills = pretrain_module.training_windows(windows, replace(cfg, drill_fraction=0.25), 1000, 1)
    drills = [w for w in mixed if w not in windows]
    assert len(mixed) == 40 and len(drills) == n_drills == 10 and mixed[:10] != schedule_windows(windows, 10, 0)
    assert all(len(w) == 32 and min(w) >= 300 for w in drills)
    only, _ = pretrain_module.training_windows(windows, replace(cfg, drill_fraction=1.0), 1000, 1)
    assert not any(w in windows for w in only)
    # <s> opens a drill only in a drills-only run; mixed with text, a drill must not look like a document
    assert all(w[0] == 1 and min(w[1:]) >= 300 for w in only) and all(w[0] != 1 for w in drills)
    with pytest.raises(ValueError, match=r"--drill-fraction 1.5 \(expected in \[0, 1\]\)"):
        replace(cfg, drill_fraction=1.5)  # PretrainConfig checks it, before any work


def test_drill_phase_with_a_constant_rate(tiny_run, tmp_path):
    """A drills-only phase (--drill-fraction 1) with --lr-scheduler-type constant_with_warmup and
    --adam-beta2: the rate stays at its peak after the warm-up, and the results record the settings."""
    d, out = tiny_run
    run = tmp_path / "drill"
    assert main(["pretrain", "--corpus", str(d / "corpus.txt"), "--output", str(run), "--init", str(out),
                 "--steps", "8", *TINY_ARGS, "--drill-fraction", "1", "--lr-scheduler-type", "constant_with_warmup",
                 "--warmup-ratio", "0.25", "--adam-beta2", "0.95"]) == 0
    results = json.loads((run / "pretrain_results.json").read_text())
    assert results["repeat_drills"] == 8 * 4 and results["epochs"] == 0
    assert results["config"]["lr_scheduler_type"] == "constant_with_warmup" and results["config"]["adam_beta2"] == 0.95
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert lrs[:2] == [0.0, 0.005] and lrs[2:] == [0.01] * 6
    assert main(["pretrain", "--corpus", str(d / "corpus.txt"), "--output", str(tmp_path / "bad"), "--init", str(out),
                 "--steps", "1", *TINY_ARGS, "--lr-scheduler-type", "flat"]) == 2


def test_seconds_per_step_trains_a_copy(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = make_windows(list(range(6, 300)) * 3, 16)
    assert pretrain_module.seconds_per_step(model, PretrainConfig(batch_size=2), windows, tok.pad_id, n=2) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_too_little_text_is_a_clear_error(tmp_path, tok_dir, capsys):
    write_corpus(["The quick brown fox.", "The lazy dog."], tmp_path / "c.txt")  # < 4 windows of 16 tokens
    assert main(["pretrain", "--corpus", str(tmp_path / "c.txt"), "--output", str(tmp_path / "m"), "--steps", "1",
                 "--tokenizer", str(tok_dir), *TINY_ARGS, "--eval-fraction", "0", "--context-length", "16"]) == 2
    assert re.search(r"make [0-3] windows of 16 tokens, fewer than one batch \(4\)", capsys.readouterr().err)


@pytest.mark.parametrize("flags,message", [
    (["--evaluations", "0"], "invalid pretraining settings: --evaluations 0 (expected >= 1 and <= 2147483647)"),
    (["--steps", "0"], "invalid pretraining settings: --steps 0 (expected >= 1 and <= 2147483647)"),
    (["--context-length", "1024"],
     "invalid pretraining settings: --context-length 1024 (expected >= 2 and <= max_position_embeddings (512)"),
    (["--context-length", "600", "--max-position-embeddings", "512"], "--context-length 600 (expected >= 2 and <="),
    # these were checked only after the corpus was read and the tokenizer trained, named as fields; the
    # eval windows, 0 or negative, silently meant all of them
    (["--eval-fraction", "1.5"], "invalid pretraining settings: --eval-fraction 1.5 (expected in [0, 1))"),
    (["--copy-fraction", "-0.5"], "invalid pretraining settings: --copy-fraction -0.5 (expected in [0, 1])"),
    (["--drill-fraction", "nan"], "invalid pretraining settings: --drill-fraction nan (expected in [0, 1])"),
    (["--eval-windows", "0"], "invalid pretraining settings: --eval-windows 0 (expected >= 1 and <= 2147483647)"),
    # a model no machine holds (petabytes of training state) failed in torch.empty after the tokenizer was trained;
    # --hidden-size 10**30 there too, in C's long long
    (["--hidden-size", str(2**24)], "GiB of memory: lower --hidden-size"),
    (["--hidden-size", str(10**30)], f"--hidden-size {10**30} (expected >= 1 and <= 2147483647)"),
    # TrainConfig's check, run before any work too
    (["--learning-rate", "5"], "invalid training config: learning_rate=5.0 (expected in (0, 1))"),
])
def test_bad_settings_fail_before_the_corpus_is_read(tmp_path, capsys, flags, message):
    """The corpus named does not exist: the settings are checked first, so the error is theirs."""
    assert main(["pretrain", "--corpus", str(tmp_path / "none.txt"), "--output", str(tmp_path / "m"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft pretrain: error: ") and message in err, err
    assert not (tmp_path / "m").exists()


def test_context_length_is_checked_against_the_model_continued(tiny_run, tmp_path, capsys):
    """--init keeps the model's max_position_embeddings (512), whatever the flag says."""
    d, out = tiny_run
    assert main(["pretrain", "--corpus", str(d / "corpus.txt"), "--output", str(tmp_path / "m"), "--init", str(out),
                 "--steps", "1", *TINY_ARGS, "--context-length", "1024", "--max-position-embeddings", "2048"]) == 2
    assert "--context-length 1024 (expected >= 2 and <= max_position_embeddings (512)" in capsys.readouterr().err


def test_held_out_documents_too_short_for_a_window_are_an_error(tmp_path, tok_dir, capsys):
    """Without this check the run trained, evaluated nothing and ended with "no held-out split"."""
    write_corpus(["The lazy dog."] * 40, tmp_path / "c.txt")  # 16 tokens each; 0.01 holds out one
    assert main(["pretrain", "--corpus", str(tmp_path / "c.txt"), "--output", str(tmp_path / "m"), "--steps", "1",
                 "--tokenizer", str(tok_dir), *TINY_ARGS, "--eval-fraction", "0.01"]) == 2
    assert "the 1 held-out documents make no window of 32 tokens" in capsys.readouterr().err


# --- the shipped base model ------------------------------------------------------------------------
def card_table() -> dict[str, str]:
    """The model card's `| field | value |` rows."""
    rows = re.findall(r"^\| *`?([\w ./-]+?)`? *\| *([^|]+?) *\|$", (SHIPPED / "README.md").read_text(), re.M)
    return dict(rows)


def test_shipped_model_is_small_and_described_by_its_card():
    size = sum(f.stat().st_size for f in SHIPPED.iterdir() if f.is_file())
    assert size <= 20_000_000, f"{size} bytes: the shipped directory must stay within 20 MB"
    cfg, card = json.loads((SHIPPED / "config.json").read_text()), card_table()
    results = json.loads((SHIPPED / "pretrain_results.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert card[key] == str(cfg[key]).lower(), key
    model = load_pretrained(SHIPPED)
    assert card["parameters"] == f"{sum(p.numel() for p in model.parameters()):,}" == f"{results['parameters']:,}"
    runs = pretrain_module.phases(results)  # the shipped model was pretrained in two runs
    assert card["steps"] == f"{sum(r['steps'] for r in runs):,}"
    assert card["tokens seen"] == f"{sum(r['tokens_seen'] for r in runs):,}"
    assert card["held-out perplexity"] == f"{results['eval_perplexity']:.2f}"
    logging_steps = max(1, runs[-1]["steps"] // 100)  # pretrain logs every 1% of its steps
    assert card["final training loss"] == (f"{results['final_train_loss']:.4f} (the mean over the last "
                                           f"{logging_steps} phase-2 steps: the last logging window)")
    assert card["context length"] == str(results["config"]["context_length"])
    assert card["induction accuracy"] == f"{induction_accuracy(model):.2f}"


def test_card_reproduces_each_run():
    """Every setting each recorded run was given (all but its paths) is in the card's Reproduce
    commands, in the same order."""
    card = (SHIPPED / "README.md").read_text()
    commands = re.search(r"## Reproduce\n\n```bash\n(.*?)```", card, re.S).group(1).replace("\\\n", " ")
    runs = pretrain_module.phases(json.loads((SHIPPED / "pretrain_results.json").read_text()))
    written = [line.split() for line in commands.splitlines() if line.startswith("minipeft pretrain")]
    assert len(written) == len(runs) == 2
    for run, line in zip(runs, written):
        args = shlex.split(run["command"])
        settings = [(a, v) for a, v in zip(args, args[1:]) if a.startswith("--") and a not in PATH_FLAGS]
        assert settings == [(a, v) for a, v in zip(line, line[1:]) if a.startswith("--") and a not in PATH_FLAGS]


def test_shipped_model_matches_transformers_and_is_trained():
    import transformers
    model, tok = load_pretrained(SHIPPED), load_tokenizer(SHIPPED)
    hf = transformers.AutoModelForCausalLM.from_pretrained(SHIPPED, attn_implementation="eager").eval()
    text = 'The json module encodes a dict: json.dumps({"name": "Ada", "age": 36}) returns a string.'
    ids = torch.tensor([tok.encode(text, bos=True)])
    with torch.no_grad():
        logits = model(ids)
        # same float32 weights and maths, different kernels (SDPA vs eager softmax): rounding only
        torch.testing.assert_close(logits, hf(ids).logits, atol=1e-4, rtol=0)
        torch.manual_seed(0)
        untrained = Transformer(model.config).eval()
        gap = causal_lm_loss(untrained(ids), ids).item() - causal_lm_loss(logits, ids).item()
    assert gap > 2.0, f"the shipped weights predict this text only {gap:.2f} nats/token better than random ones"


def test_shipped_tokenizer_round_trips_and_matches_transformers():
    tok = load_tokenizer(SHIPPED)
    text = 'User: Extract the name.\n\n{"name": "Zoë", "tags": ["a", "b"]}\nAssistant: {"name": "Zoë"} ✓'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tok.encode(special, add_dummy_prefix=False) == [tok.token_to_id(special)]
    import transformers
    import google.protobuf  # noqa: F401  # transformers converts tokenizer.model with it
    hf = transformers.AutoTokenizer.from_pretrained(SHIPPED)
    assert hf(text)["input_ids"] == [tok.bos_id, *ids]
