"""minipeft.metrics against independent references.

BLEU against sacrebleu.corpus_bleu, ROUGE against rouge_score.RougeScorer, loss/perplexity/
accuracy against torch.nn.functional.cross_entropy and a float64 log-softmax written here.
BLEU and ROUGE do the same integer counting and the same float operations in the same order as
their references, so scores are compared to 1e-9 (far inside the promised 0.01 BLEU / 1e-6 ROUGE):
only a counting or tokenization bug could move them, and those move scores by far more.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minipeft.metrics import (IGNORE_INDEX, StreamingLMMetrics, bleu_tokenize, causal_lm_loss, corpus_bleu, head_loss,
                              exact_match, exact_match_accuracy, normalize_answer, perplexity, rouge, rouge_pair,
                              rouge_tokenize, token_accuracy)

import sacrebleu
from rouge_score import rouge_scorer

# (hypothesis, reference): punctuation, numbers, hyphens, apostrophes, entities, quotes, empty,
# shorter/longer than the reference, identical strings, newlines, non-ASCII.
EN_PAIRS = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("It's a state-of-the-art model, isn't it?", "It is a state-of-the-art model, is it not?"),
    ("Prices rose 3.5% to $1,250.75 in 2023-2024.", "Prices rose by 3.5% to $1,250.75 during 2023-2024."),
    ("", "An empty hypothesis scores nothing."),
    ("Short.", "This reference is much longer than the hypothesis."),
    ("Identical strings are identical.", "Identical strings are identical."),
    ("Tom &amp; Jerry said &quot;hi&quot; &lt;3", 'Tom & Jerry said "hi" <3'),
    ("Visit https://example.com/a_b?x=1&y=2 now!", "Visit https://example.com/a_b?x=1&y=2 today!"),
    ("He said: (maybe) [not] {sure}; ok...", "He said (maybe) not sure, ok."),
    ("Version .5 vs 0.5, 1.-2 and a.,b", "version 0.5 vs .5, 1-2 and a., b"),
    ("Line one-\nline two\nthree <skipped> four", "Line oneline two three four"),
    ("Don't stop  believing   ", "Don't stop believing"),
    ("café — “naïve” résumé…", "cafe - \"naive\" resume..."),
    ("THE QUICK BROWN FOX", "the quick brown fox jumps"),
    ("1 2 3 4 5 6 7 8 9 10", "1 2 3 4 5 6 7 8 9 10 11 12"),
    ("the the the the the the the", "the cat is on the mat"),
    ("LoRA adapts W + BA with r=8, alpha=16.", "LoRA adapts W + BA where r = 8 and alpha = 16."),
    ("x", "x"),
]
ZH_PAIRS = [
    ("今天天气很好。", "今天的天气非常好。"),
    ("我们使用LoRA微调了模型，效果不错！", "我们用LoRA对模型进行了微调，效果很好。"),
    ("价格上涨了3.5%，达到1,250元。", "价格上涨3.5%，达到了1,250元。"),
    ("", "空的假设得零分。"),
    ("好。", "这个参考答案比假设长得多。"),
    ("完全相同的句子。", "完全相同的句子。"),
    ("他说：“你好”——再见……", "他说“你好”，再见。"),
    ("ＧＰＴ－４是一个模型", "GPT-4是一个大模型"),
    ("北京、上海和广州《城市》", "北京，上海与广州"),
    ("QLoRA 把权重量化为 NF4 格式", "QLoRA将权重量化成NF4格式"),
    ("第1章 第2节", "第一章 第二节"),
    ("𠀀字不在表中 ☺ ★", "𠀀字 ☺★"),
]

INTL_PAIRS = [("Привет, мир! Это тест модели.", "привет мир, это простой тест"),
              ("안녕하세요 세계 모델을 미세 조정했습니다", "안녕하세요 모델을 조정했습니다"),
              ("Η γάτα κάθεται στο χαλί", "η γάτα στο χαλί"),
              ("Модель LoRA-2 и 模型 v2", "модель lora 2 и 模 型"),
              ("«Цена» — 1 000,50 ₽; „так“…", "«цена» 1 000,50 ₽ — так")]


def _sacre_bleu(pairs_or_hyps, refs=None, **kwargs):
    hyps, refs = (pairs_or_hyps, refs) if refs is not None else ([h for h, _ in pairs_or_hyps],
                                                                 [[r for _, r in pairs_or_hyps]])
    return sacrebleu.corpus_bleu(hyps, refs, **kwargs)


def _assert_bleu_equal(ours, ref):
    assert ours.score == pytest.approx(ref.score, abs=1e-9)
    assert list(ours.precisions) == pytest.approx(list(ref.precisions), abs=1e-9)
    assert ours.bp == pytest.approx(ref.bp, abs=1e-12)
    assert (ours.sys_len, ours.ref_len) == (ref.sys_len, ref.ref_len)


# ----------------------------------------------------------------------------------------- BLEU

@pytest.mark.parametrize("tokenize,pairs", [("13a", EN_PAIRS), ("zh", ZH_PAIRS + EN_PAIRS),
                                            ("char", ZH_PAIRS + EN_PAIRS), ("intl", INTL_PAIRS + EN_PAIRS),
                                            ("none", ZH_PAIRS + EN_PAIRS)])
def test_bleu_tokenizers_match_sacrebleu(tokenize, pairs):
    reference_tokenizer = sacrebleu.BLEU(tokenize=tokenize).tokenizer
    tricky = [".5 starts", " .5 after a space", "a.,b", "1.-2", "&amp;quot;", "x-\n", "1,000.5 €", "«a»,,b", "2024.",
              "x..y", "..1", "1..", "a+-b"]
    for text in [t for pair in pairs for t in pair] + tricky:
        assert bleu_tokenize(text, tokenize) == reference_tokenizer(text.rstrip()).split(), text


def test_zh_tokenizer_splits_exactly_the_code_points_sacrebleu_does():
    # Every BMP character plus a few supplementary ones; covers sacrebleu's quirky effective ranges.
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh
    reference = TokenizerZh()
    chars = [chr(c) for c in range(0x21, 0x10000)] + ["\U00020000", "\U0002A6D6", "\U0001F600"]
    for start in range(0, len(chars), 2048):  # "x" between characters: a misclassified one changes the tokens
        text = "x".join(chars[start:start + 2048])
        assert bleu_tokenize(text, "zh") == reference(text).split(), f"characters {start}..{start + 2047}"


def test_intl_tokenizer_classes_every_code_point_as_sacrebleu_does():
    # Each character between letters, between digits and doubled: its Unicode class (punctuation, number,
    # symbol or other) decides all three of the intl rules. Code points this Python's Unicode leaves
    # unassigned are skipped: sacrebleu's `regex` module may have a newer Unicode database.
    import unicodedata
    from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International
    reference = TokenizerV14International()
    chars = [chr(c) for c in range(0x21, 0x30000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    for start in range(0, len(chars), 1024):
        text = " ".join(f"x{c}x 1{c}1 {c}{c}1" for c in chars[start:start + 1024])
        assert bleu_tokenize(text, "intl") == reference(text).split(), f"characters {start}..{start + 1023}"


@pytest.mark.parametrize("tokenize,pairs", [("13a", EN_PAIRS), ("zh", ZH_PAIRS), ("char", ZH_PAIRS),
                                            ("intl", INTL_PAIRS)])
@pytest.mark.parametrize("lowercase", [False, True])
def test_corpus_bleu_matches_sacrebleu(tokenize, pairs, lowercase):
    ours = corpus_bleu([h for h, _ in pairs], [r for _, r in pairs], tokenize=tokenize, lowercase=lowercase)
    _assert_bleu_equal(ours, _sacre_bleu(pairs, tokenize=tokenize, lowercase=lowercase))
    assert 0 < ours.score < 100


def test_corpus_bleu_multiple_references_match_sacrebleu():
    hyps = [h for h, _ in EN_PAIRS]
    # A variable number of references per hypothesis (1 to 3); sacrebleu spells a missing one None.
    extra = ["The cat was sitting on the mat.", "Prices rose 3.5 % to $ 1,250.75.", "Identical strings."]
    per_hyp = [[r] + ([extra[i % 3]] if i % 2 else []) + ([h] if i % 5 == 0 else [])
               for i, (h, r) in enumerate(EN_PAIRS)]
    streams = [[refs[k] if k < len(refs) else None for refs in per_hyp] for k in range(3)]
    for tokenize in ("13a", "char"):
        _assert_bleu_equal(corpus_bleu(hyps, per_hyp, tokenize=tokenize),
                           sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize))


@pytest.mark.parametrize("smooth,value", [("exp", None), ("floor", None), ("floor", 0.3), ("add-k", None),
                                          ("add-k", 2.0), ("none", None)])
@pytest.mark.parametrize("effective_order", [False, True])
def test_corpus_bleu_smoothing_matches_sacrebleu(smooth, value, effective_order):
    # Short corpora leave some n-gram orders with zero matches or zero totals: smoothing decides.
    corpora = [EN_PAIRS[:1], [("a b c", "a b d")], [("a b", "a b")], [("x y z w", "x q z r")], EN_PAIRS]
    for pairs in corpora:
        ours = corpus_bleu([h for h, _ in pairs], [r for _, r in pairs], smooth=smooth, smooth_value=value,
                           effective_order=effective_order)
        ref = _sacre_bleu(pairs, smooth_method=smooth, smooth_value=value, use_effective_order=effective_order)
        assert ours.score == pytest.approx(ref.score, abs=1e-9), (pairs, smooth)
        assert ours.bp == pytest.approx(ref.bp, abs=1e-12)


def test_corpus_bleu_edge_cases():
    assert corpus_bleu(["The same words here."], ["The same words here."]).score == pytest.approx(100.0)
    empty = corpus_bleu(["", ""], ["a reference", "another one"])
    assert (empty.score, empty.bp, empty.sys_len, empty.ref_len) == (0.0, 0.0, 0, 4)
    # Three tokens have no 4-gram: 0 by default, positive with effective_order (as sacrebleu).
    assert corpus_bleu(["a b c"], ["a b c"]).score == 0.0
    assert corpus_bleu(["a b c"], ["a b c"], effective_order=True).score == pytest.approx(100.0)
    # "none" splits on whitespace only, as sacrebleu's tokenize="none" (text tokenized beforehand).
    assert bleu_tokenize("a.b  ,c\t&amp;\n", "none") == ["a.b", ",c", "&amp;"]
    # Closest reference length, ties broken towards the shorter reference.
    assert corpus_bleu(["a b c d"], [["a b c", "a b c d e"]]).ref_len == 3


def test_corpus_bleu_rejects_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], [["a", "b"]])  # sacrebleu's transposed layout
    with pytest.raises(ValueError, match=r"tokenize='flores200', expected one of "
                                         r"\['13a', 'char', 'intl', 'none', 'zh'\]"):
        corpus_bleu(["a"], ["a"], tokenize="flores200")
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu([], [])
    assert rouge_tokenize("Модель LoRA-2 и 模型, café", lang="intl") == ["модель", "lora", "2", "и", "模", "型",
                                                                       "café"]
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        corpus_bleu(["a"], [[]])
    with pytest.raises(ValueError, match="takes no smooth_value"):
        corpus_bleu(["a"], ["a"], smooth="exp", smooth_value=0.1)
    with pytest.raises(TypeError, match="bare string"):
        corpus_bleu("a b", ["a b"])


# ---------------------------------------------------------------------------------------- ROUGE

TYPES = ["rouge1", "rouge2", "rougeL"]


class _WhitespaceTokenizer:
    """rouge-score tokenizer for pre-split text (its default one drops all non-ASCII characters)."""

    def tokenize(self, text):
        return text.split()


def _space_chinese(text: str) -> str:
    """Independent spelling of lang="zh" tokenization: lowercase, non-ASCII alphanumerics become
    single tokens, ASCII letters/digits stay words, everything else is a separator."""
    out = []
    for c in text.lower():
        if ord(c) > 127 and c.isalnum():
            out.append(f" {c} ")
        elif ord(c) < 128 and c.isalnum():
            out.append(c)
        else:
            out.append(" ")
    return "".join(out)


def _assert_rouge_pair_equal(ours, ref):
    for t in TYPES:
        assert tuple(ours[t]) == pytest.approx(tuple(ref[t]), abs=1e-12), t


def test_rouge_english_matches_rouge_score_per_pair_and_corpus():
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    refs = [scorer.score(r, h) for h, r in EN_PAIRS]  # rouge-score takes (target, prediction)
    for (h, r), ref in zip(EN_PAIRS, refs):
        _assert_rouge_pair_equal(rouge_pair(h, r), ref)
    corpus = rouge([h for h, _ in EN_PAIRS], [r for _, r in EN_PAIRS])
    for t in TYPES:
        n = len(refs)
        assert corpus[t] == pytest.approx(sum(s[t].fmeasure for s in refs) / n, abs=1e-12)
        assert corpus[f"{t}_precision"] == pytest.approx(sum(s[t].precision for s in refs) / n, abs=1e-12)
        assert corpus[f"{t}_recall"] == pytest.approx(sum(s[t].recall for s in refs) / n, abs=1e-12)
    assert 0 < corpus["rougeL"] < 1


def test_rouge_multiple_references_match_score_multi():
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    for h, r in EN_PAIRS:
        refs = [r, "the mat", h.upper() + " extra words"]
        _assert_rouge_pair_equal(rouge_pair(h, refs), scorer.score_multi(refs, h))


def test_rouge_chinese_matches_rouge_score_on_spaced_characters():
    scorer = rouge_scorer.RougeScorer(TYPES, tokenizer=_WhitespaceTokenizer())
    for h, r in ZH_PAIRS:
        _assert_rouge_pair_equal(rouge_pair(h, r, lang="zh"), scorer.score(_space_chinese(r), _space_chinese(h)))
    # Why lang="zh" exists: rouge-score's default tokenizer sees no tokens in Chinese text.
    default = rouge_scorer.RougeScorer(TYPES).score("今天天气很好", "今天天气很好")
    assert default["rouge1"].fmeasure == 0.0
    assert rouge(["今天天气很好"], ["今天天气很好"], lang="zh")["rouge1"] == 1.0


def _space_intl(text: str) -> str:
    """Independent spelling of lang="intl": lowercase, letters and digits of any script form words,
    kana and CJK ideographs are single tokens, everything else is a separator."""
    out = []
    for c in text.lower():
        cjk = any(lo <= c <= hi for lo, hi in (("\u3040", "\u30ff"), ("\u3400", "\u4dbf"), ("\u4e00", "\u9fff"),
                                               ("\uf900", "\ufaff")))
        out.append(f" {c} " if cjk else c if c.isalnum() else " ")
    return "".join(out)


def test_rouge_intl_matches_rouge_score_on_spaced_words():
    scorer = rouge_scorer.RougeScorer(TYPES, tokenizer=_WhitespaceTokenizer())
    for h, r in INTL_PAIRS + ZH_PAIRS + EN_PAIRS:
        _assert_rouge_pair_equal(rouge_pair(h, r, lang="intl"), scorer.score(_space_intl(r), _space_intl(h)))
    # Why lang="intl" exists: rouge-score's default tokenizer drops Cyrillic, Hangul, Greek ...
    assert rouge_scorer.RougeScorer(TYPES).score(*INTL_PAIRS[0])["rouge1"].fmeasure == 0.0
    assert rouge([INTL_PAIRS[1][0]], [INTL_PAIRS[1][0]], lang="intl")["rouge2"] == 1.0


def test_rouge_tokenizers():
    assert rouge_tokenize("It's state-of-the-art: 3.5%, café!") == ["it", "s", "state", "of", "the", "art", "3",
                                                                   "5", "caf"]
    assert rouge_tokenize("我们用LoRA微调，GPT-4很强！", lang="zh") == ["我", "们", "用", "lora", "微", "调", "gpt",
                                                                     "4", "很", "强"]
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        rouge_pair("a", [])
    with pytest.raises(ValueError, match="lang='fr'"):
        rouge(["a"], ["a"], lang="fr")


# ------------------------------------------------------------------------------ LM loss/perplexity

def _reference_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(sum NLL, kept tokens, correct argmax) by explicit loops over positions in float64."""
    logp = logits.double().log_softmax(-1)
    nll, n, correct = 0.0, 0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE_INDEX:
                nll -= float(logp[b, t, y])
                n += 1
                correct += int(int(logits[b, t].double().argmax()) == y)
    return nll, n, correct


def _batch(b: int, t: int, v: int, seed: int, mask_frac: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < mask_frac] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("shape", [(1, 2, 5), (3, 7, 11), (2, 17, 131)])
def test_causal_lm_loss_matches_cross_entropy_and_explicit_loop(shape):
    logits, labels = _batch(*shape, seed=sum(shape))
    labels[0, 1] = 3  # at least one kept target
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, shape[2]), labels[:, 1:].reshape(-1), ignore_index=-100)
    nll, n, correct = _reference_nll(logits, labels)
    loss = causal_lm_loss(logits, labels)
    # float32 sums of O(10) values: 1e-5 relative covers rounding, not a wrong token or mask.
    assert float(loss) == pytest.approx(float(ce), rel=1e-5)
    assert float(loss) == pytest.approx(nll / n, rel=1e-5)
    assert float(causal_lm_loss(logits, labels, reduction="sum")) == pytest.approx(nll, rel=1e-5)
    assert perplexity(logits, labels) == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert token_accuracy(logits, labels) == correct / n


def test_masked_positions_and_first_label_do_not_matter():
    logits, labels = _batch(2, 9, 13, seed=1)
    labels[:, 1] = 4
    base = float(causal_lm_loss(logits, labels))
    changed_logits, changed_labels = logits.clone(), labels.clone()
    changed_labels[:, 0] = 7  # labels[:, 0] is never predicted
    masked_b, masked_t = torch.nonzero(labels[:, 1:] == IGNORE_INDEX, as_tuple=True)
    changed_logits[masked_b, masked_t] += 100 * torch.randn(len(masked_b), 13)  # logits predicting masked targets
    changed_logits[:, -1] = 1e4  # the last position predicts nothing
    assert float(causal_lm_loss(changed_logits, changed_labels)) == pytest.approx(base, rel=1e-6)
    unmasked = labels.clone()
    unmasked[labels == IGNORE_INDEX] = 0
    assert float(causal_lm_loss(logits, unmasked)) != pytest.approx(base, rel=1e-3)  # the mask had an effect


def test_streaming_equals_one_big_batch_and_differs_from_mean_of_perplexities():
    v = 23
    batches = [_batch(b, t, v, seed=i) for i, (b, t) in enumerate([(2, 5), (1, 12), (3, 3), (4, 8)])]
    stream = StreamingLMMetrics()
    for logits, labels in batches:
        stream.update(logits, labels)
    # One big batch: right-pad every batch to the longest T with ignored labels.
    t_max = max(l.shape[1] for l, _ in batches)
    big_logits = torch.cat([F.pad(l, (0, 0, 0, t_max - l.shape[1])) for l, _ in batches])
    big_labels = torch.cat([F.pad(y, (0, t_max - y.shape[1]), value=IGNORE_INDEX) for _, y in batches])
    got = stream.compute()
    nll, n, correct = _reference_nll(big_logits, big_labels)
    assert got["num_tokens"] == n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert got["token_accuracy"] == correct / n
    assert got["loss"] == pytest.approx(float(causal_lm_loss(big_logits, big_labels)), rel=1e-6)
    mean_of_ppl = sum(perplexity(l, y) for l, y in batches) / len(batches)
    assert abs(mean_of_ppl - got["perplexity"]) > 0.01 * got["perplexity"]  # the biased alternative
    stream.reset()
    with pytest.raises(ValueError, match="no labelled tokens"):
        stream.compute()


def test_bf16_logits_are_scored_in_float32():
    logits, labels = _batch(2, 11, 97, seed=5)
    logits_bf16 = logits.bfloat16().requires_grad_()
    loss = causal_lm_loss(logits_bf16, labels)
    assert loss.dtype == torch.float32
    # Exactly the float32 loss of the bf16-rounded values (a bf16 log-softmax would be ~1e-2 off).
    assert loss.item() == pytest.approx(causal_lm_loss(logits_bf16.detach().float(), labels).item(), rel=1e-6)
    nll, n, _ = _reference_nll(logits_bf16.detach(), labels)
    assert loss.item() == pytest.approx(nll / n, rel=1e-5)
    loss.backward()
    assert logits_bf16.grad.dtype == torch.bfloat16 and logits_bf16.grad.abs().sum() > 0
    assert perplexity(logits_bf16.detach(), labels) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_fully_masked_batch_gives_zero_loss_not_nan():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[:, 0] = 1  # only the unpredicted first column is labelled
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
    with pytest.raises(ValueError, match="no labelled tokens"):
        perplexity(logits.detach(), labels)
    with pytest.raises(ValueError, match="no labelled tokens"):
        token_accuracy(logits.detach()[:, :1], labels[:, :1])  # T == 1: nothing to predict


def test_lm_metrics_reject_bad_input():
    logits = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        causal_lm_loss(logits, torch.full((2, 5), 7))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        causal_lm_loss(logits, torch.full((2, 5), -1))
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) and labels \(2, 4\)"):
        causal_lm_loss(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 or int32"):
        causal_lm_loss(logits, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="reduction='none'"):
        causal_lm_loss(logits, torch.zeros(2, 5, dtype=torch.long), reduction="none")


@pytest.mark.parametrize("b,t,d,v,mask_frac,dtype", [
    (1, 2, 4, 5, 0.0, torch.float32), (3, 9, 8, 31, 0.6, torch.float32), (2, 17, 16, 131, 0.95, torch.float32),
    (2, 13, 16, 97, 0.5, torch.bfloat16)])
def test_head_loss_equals_causal_lm_loss_on_all_logits_value_and_gradients(b, t, d, v, mask_frac, dtype):
    """head_loss(h, y, head) skips unscored positions; the loss and every gradient (hidden states,
    head weight) must equal causal_lm_loss(head(h), y)'s, which computes logits everywhere."""
    g = torch.Generator().manual_seed(b * t + v)
    hidden = torch.randn(b, t, d, generator=g).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < mask_frac] = IGNORE_INDEX
    labels[0, -1] = 1  # at least one scored token
    head = torch.nn.Linear(d, v, bias=False).to(dtype)
    results = []
    for loss_fn in (lambda h: causal_lm_loss(head(h), labels, reduction="sum"),
                    lambda h: head_loss(h, labels, head, reduction="sum")):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        loss = loss_fn(h)
        loss.backward()
        results.append((loss.detach(), h.grad.float(), head.weight.grad.float()))
    (ref, ref_dh, ref_dw), (got, dh, dw) = results
    # float32: the same products summed in another order (1e-5); bf16: the logits are the same bf16
    # products for the kept rows, the gradients are accumulated in bf16 matmuls (2e-2 relative).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=tol)
    torch.testing.assert_close(dh, ref_dh, rtol=tol, atol=tol * ref_dh.abs().max().item())
    torch.testing.assert_close(dw, ref_dw, rtol=tol, atol=tol * ref_dw.abs().max().item())
    assert dh[:, -1].abs().sum() == 0  # the last position predicts nothing: no gradient reaches it
    mean = head_loss(hidden, labels, head)
    assert mean.item() == pytest.approx(causal_lm_loss(head(hidden), labels).item(), rel=tol)


def test_head_loss_fully_masked_and_bad_input():
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = head_loss(hidden, labels, head)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        head_loss(hidden, torch.full((2, 5), 7), head)
    with pytest.raises(ValueError, match=r"hidden \(2, 5, 4\) and labels \(2, 4\)"):
        head_loss(hidden, torch.zeros(2, 4, dtype=torch.long), head)
    with pytest.raises(ValueError, match="reduction='none'"):
        head_loss(hidden, labels, head, reduction="none")


# ---------------------------------------------------------------------------------- exact match

@pytest.mark.parametrize("pred,ref,ignore_case,expected", [
    ("  Paris\n", "Paris", False, True),
    ("New   York\tCity", "New York City", False, True),
    ("paris", "Paris", False, False),
    ("paris", "Paris", True, True),
    ("Straße", "STRASSE", True, True),  # casefold, not lower
    ("Paris.", "Paris", True, False),  # punctuation is kept
    ('{"b": [1, 2], "a": "x"}', '{ "a":"x", "b":[1,2] }', False, True),  # JSON: key order, spacing
    ('{"a": true}', '{"a": 1}', False, False),  # not Python's True == 1
    ('{"a": 1}', '{"a": 1.0}', False, False),
    ('{"a": "X"}', '{"a": "x"}', True, False),  # JSON values are data: case-sensitive
    ('{"a": 1', '{"a": 1', False, True),  # does not parse: text path
    ("TRUE", "true", True, True),
    ('"Paris"', '"paris"', True, True),  # JSON scalars stay on the text path, so ignore_case applies
])
def test_exact_match(pred, ref, ignore_case, expected):
    assert exact_match(pred, ref, ignore_case=ignore_case) is expected


def test_exact_match_accuracy_and_options():
    preds, refs = ["a  b", '{"k": [1]}', "C"], ["a b", '{"k":[1]}', "c"]
    assert exact_match_accuracy(preds, refs) == pytest.approx(2 / 3)
    assert exact_match_accuracy(preds, refs, ignore_case=True) == 1.0
    assert exact_match_accuracy(preds, refs, compare_json=False) == pytest.approx(1 / 3)
    assert normalize_answer(" \n A\u3000b ") == "A b"  # ideographic space is whitespace too
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        exact_match_accuracy(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"references\[0\] is list"):
        exact_match_accuracy(["a"], [["a"]])


def test_chinese_bleu_needs_zh_tokenizer():
    # The user error the zh tokenizer exists to prevent: with 13a a Chinese sentence is one token.
    assert bleu_tokenize("今天天气很好。", "13a") == ["今天天气很好。"]
    assert bleu_tokenize("今天天气很好。", "zh") == list("今天天气很好。")
    assert corpus_bleu(["今天天气很好。"], ["今天天气很好。"], tokenize="zh").score == pytest.approx(100.0)
