"""Generation-based evaluation on a held-out test set (the outline's 5.2): generate, score, spot-check.

For each test conversation (messages m_1..m_n, m_n the reference reply r):

    prompt  = template.render_prompt(m_1..m_{n-1})    the exact prefix the model was trained on
    reply   = greedy continuation of prompt, cut before the first stop id (template.stop_token_ids),
              decoded and stripped, at most max_new_tokens tokens
    teacher forcing: template.render(m_1..m_n, mode="last") scores r token by token

Prompts are generated in left-padded batches (sorted by length, so rows of a batch pad little);
the model's positions count real tokens only, so a batch gives the same replies as one-by-one.

Metrics (exact match is normalized and JSON-aware: minipeft.metrics.exact_match_metric):
    every task      loss, perplexity, token_accuracy    teacher-forced, token-weighted over all replies
    classification  accuracy                            exact match of the label
                    invalid_label_rate                  predictions that exactly match no reference label
    json            exact_match                         compared as parsed JSON
                    valid_json_rate                     predictions that parse as a strict JSON object
                                                        (RFC 8259: no NaN or Infinity, nor 1e400 that
                                                        reads as one; no key twice), as written: a
                                                        reply in a Markdown code fence or with text
                                                        around the object is not valid JSON
                    required_fields_present             among examples whose reference is an object:
                                                        the prediction is an object holding all its keys
    generation      exact_match, bleu (0-100, sacrebleu's 13a, "zh" when lang="zh", "intl" when "intl"),
                    rouge1 / rouge2 / rougeL / rougeLsum F1 (0-1; rougeLsum: LCS over the lines of
                    each reply, as summaries are scored; characters as tokens for Chinese when lang="zh",
                    words of any script when lang="intl": metrics.rouge)

Task detection (task=None), on the reference replies:
    json            every reference parses as a JSON object
    classification  at most 20 distinct references, each at most 3 whitespace-separated words
                    and 6 CJK characters (Chinese has no spaces: a sentence is one "word"), and
                    fewer distinct references than examples (some label repeats: unique short
                    answers are a QA set, not labels)
    generation      otherwise
Language detection (lang=None): "zh" when any reference holds a CJK ideograph or kana. "en"
tokenization (rouge-score's) deletes every such character and 13a leaves a Chinese sentence one
token, so in a bilingual set identical Chinese replies scored ROUGE 0 and no BLEU n-gram. "zh"
splits English as "en" does: ROUGE exactly; BLEU (sacrebleu's zh) but for 13a's entity and
line-break rules and a "." or "," at a line's very start or end beside a digit ("costs 5.").
Else "intl" when a reference holds a letter of another script than Latin (Cyrillic, Hangul,
Greek, ...), which "en" deletes as well: identical Russian replies scored ROUGE 0. Accented Latin
letters stay "en", as rouge-score scores them ("café" -> "caf").

`write_report` writes metrics.json and samples.md, a seeded random sample of (prompt, reference,
prediction, exact match) for the human spot check (人工抽样评估). tests/test_evaluate.py checks
prompts, batching, stopping and every metric against direct calls of minipeft.metrics.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import collate, pad_rows
from .data.formats import Example
from .generation import generate
from .metrics import StreamingLMMetrics, corpus_bleu, exact_match, exact_match_accuracy, normalize_answer, rouge
from .metrics.exact_match_metric import AnswerSet, parse_json
from .metrics.rouge_metric import CJK
from .files import json_bytes, staged_dir
from .templates import ChatTemplate, Rendered
from .tokenizer import Tokenizer

TASKS = ("classification", "json", "generation")
LANGS = ("en", "zh", "intl")
BLEU_TOKENIZE = {"en": "13a", "zh": "zh", "intl": "intl"}  # sacrebleu's tokenizer for each
MAX_LABELS = 20
MAX_LABEL_WORDS = 3
MAX_LABEL_CJK = 6  # characters: 正面, 非常满意 are labels; a sentence is not
_CJK = re.compile(f"[{CJK}]")
_NON_LATIN = re.compile(r"[^\W\d_\u0000-\u024f\u1e00-\u1eff]")  # a letter outside the Latin blocks


@dataclass
class EvalResult:
    """What `evaluate` found; predictions[i], matches[i], finished[i] belong to examples[i]."""

    task: str
    lang: str
    metrics: dict[str, float]
    counts: dict[str, int]
    examples: list[Example]
    predictions: list[str]
    matches: list[bool]  # exact_match(prediction, reference), JSON-aware
    finished: list[bool]  # the reply ended with a stop id (False: cut at max_new_tokens)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def references(self) -> list[str]:
        return [e.response for e in self.examples]


def _json_object(text: str) -> Optional[dict]:
    """`text` parsed as a strict JSON object (metrics.exact_match_metric.parse_json: no NaN or Infinity,
    no number beyond a double's range, no key given twice), else None."""
    try:
        value = parse_json(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def detect_task(references: Sequence[str]) -> str:
    """"json", "classification" or "generation" from the reference replies (module docstring rule)."""
    if not references:
        raise ValueError("detect_task: no references")
    if all(_json_object(r) is not None for r in references):
        return "json"
    labels = {normalize_answer(r) for r in references}
    if len(labels) <= MAX_LABELS and len(labels) < len(references) and \
            all(len(label.split()) <= MAX_LABEL_WORDS and len(_CJK.findall(label)) <= MAX_LABEL_CJK
                for label in labels):
        return "classification"
    return "generation"


def detect_lang(references: Sequence[str]) -> str:
    """"zh" when any reference holds a CJK ideograph or kana, else "intl" when one holds a letter of
    another non-Latin script, else "en" (module docstring: why any)."""
    if any(_CJK.search(r) for r in references):
        return "zh"
    return "intl" if any(_NON_LATIN.search(r) for r in references) else "en"


def _batches(n: int, batch_size: int, desc: str, progress: bool):
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        yield slice(start, min(start + batch_size, n))


def virtual_tokens(model: nn.Module) -> int:
    """The positions a prefix- or prompt-tuned model's active adapter puts before every input
    (prompt_learning: the real tokens' positions start after them); 0 for any other model. Counted
    under disable_adapter too, where they are not read: a room short by them, never past the context."""
    config = getattr(model, "active_peft_config", None)
    return config.virtual_tokens if config is not None else 0


def _no_room(prompt: int, virtual: int, context: int) -> str:
    after = f" after {virtual} virtual tokens" if virtual else ""
    return (f"a prompt of {prompt} tokens{after} fills the model's context of {context} tokens: nothing can be "
            "generated after it")


@torch.no_grad()
def generate_replies(model: nn.Module, prompts: Sequence[list[int]], stop_ids: Sequence[int], pad_id: int,
                     max_new_tokens: int, batch_size: int, progress: bool = True) -> list[tuple[list[int], bool]]:
    """Greedy replies (ids before the first stop id, whether a stop id came) in prompt order, of
    at most max_new_tokens, and never past the model's context (max_position_embeddings: the
    positions it was trained on), counted from a batch's longest prompt after the virtual tokens
    of prefix or prompt tuning.

    Longest prompts first: rows of a batch have similar lengths (little padding), and a batch
    too big for memory fails at once rather than at the end.
    """
    device, context = next(model.parameters()).device, model.config.max_position_embeddings
    virtual = virtual_tokens(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    for rows in _batches(len(order), batch_size, "eval: generate", progress):
        batch = [prompts[i] for i in order[rows]]
        ids = pad_rows(batch, pad_id, "left").to(device)
        mask = pad_rows([[1] * len(p) for p in batch], 0, "left").to(device)
        room = context - virtual - ids.shape[1]
        if room < 1:
            raise ValueError(_no_room(ids.shape[1], virtual, context))
        out = generate(model, ids, min(max_new_tokens, room), eos_token_id=list(stop_ids), attention_mask=mask,
                       pad_token_id=pad_id)
        for i, new in zip(order[rows], out[:, ids.shape[1]:].tolist()):
            cut = next((t for t, token in enumerate(new) if token in stop_ids), None)
            replies[i] = (new, False) if cut is None else (new[:cut], True)
    return replies


@torch.no_grad()
def reference_metrics(model: nn.Module, rendered: Sequence[Rendered], pad_id: int,
                      batch_size: int, progress: bool = True) -> dict[str, float]:
    """Teacher-forced loss, perplexity, token_accuracy, num_tokens over rendered (ids, labels)."""
    device = next(model.parameters()).device
    acc = StreamingLMMetrics()
    for rows in _batches(len(rendered), batch_size, "eval: reference loss", progress):
        batch = {k: v.to(device) for k, v in collate(rendered[rows], pad_id).items()}
        acc.update(model(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"])
    return acc.compute()


def task_metrics(task: str, predictions: list[str], references: list[str], lang: str,
                 rouge_stemmer: bool = False) -> dict[str, float]:
    """The metrics of one task (module docstring) on decoded predictions; rouge_stemmer: ROUGE compares
    Porter stems (rouge-score's use_stemmer, off by default there and in Hugging Face evaluate)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}, expected one of {TASKS}")
    if task == "classification":
        labels = AnswerSet(references)  # matched as accuracy matches: a correct reply is never an invalid label
        return {"accuracy": exact_match_accuracy(predictions, references),
                "invalid_label_rate": sum(p not in labels for p in predictions) / len(predictions)}
    if task == "json":
        parsed = [_json_object(p) for p in predictions]
        objects = [(p, ref) for p, r in zip(parsed, references) if (ref := _json_object(r)) is not None]
        metrics = {"exact_match": exact_match_accuracy(predictions, references),
                   "valid_json_rate": sum(p is not None for p in parsed) / len(parsed)}
        if objects:
            metrics["required_fields_present"] = sum(p is not None and ref.keys() <= p.keys()
                                                     for p, ref in objects) / len(objects)
        return metrics
    scores = rouge(predictions, references, lang=lang, use_stemmer=rouge_stemmer)
    return {"exact_match": exact_match_accuracy(predictions, references),
            "bleu": corpus_bleu(predictions, references, tokenize=BLEU_TOKENIZE[lang]).score,
            **{k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}}


def _check_args(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[Example], task: Optional[str],
                lang: Optional[str], max_new_tokens: int, batch_size: int) -> None:
    if not examples:
        raise ValueError("evaluate: no test examples")
    if task not in (None, *TASKS):
        raise ValueError(f"evaluate: task={task!r}, expected one of {TASKS} or None (detect)")
    if lang not in (None, *LANGS):
        raise ValueError(f"evaluate: lang={lang!r}, expected one of {LANGS} or None (detect)")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"evaluate: max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary has "
                         f"{vocab}: they do not belong together")


def _render(template: ChatTemplate, tokenizer: Tokenizer, example: Example) -> tuple[list[int], Rendered]:
    """(generation prompt, teacher-forcing ids and labels) of one example; errors name its line."""
    try:
        return (template.render_prompt(example.messages[:-1], tokenizer),
                template.render(example.messages, tokenizer, mode="last"))
    except ValueError as e:
        raise ValueError(f"{example.source}:{example.line}: {e}") from None


def evaluate(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[Example], template: ChatTemplate,
             max_new_tokens: int = 256, batch_size: int = 8, task: Optional[str] = None,
             lang: Optional[str] = None, progress: bool = True, rouge_stemmer: bool = False) -> EvalResult:
    """Generate a reply to every example's prompt and score it (module docstring); the model is
    put in eval mode for the run and restored after."""
    _check_args(model, tokenizer, examples, task, lang, max_new_tokens, batch_size)
    references = [e.response for e in examples]
    chosen_task, chosen_lang = task or detect_task(references), lang or detect_lang(references)
    stop_ids = template.stop_token_ids(tokenizer)
    prompts, rendered = zip(*(_render(template, tokenizer, e) for e in examples))
    context, virtual = model.config.max_position_embeddings, virtual_tokens(model)
    for e, prompt in zip(examples, prompts):  # named before any generation; generate_replies sees a batch only
        if len(prompt) + virtual >= context:
            raise ValueError(f"{e.source}:{e.line}: {_no_room(len(prompt), virtual, context)}: leave it out or "
                             "shorten it")
    was_training = model.training
    model.eval()
    try:
        replies = generate_replies(model, prompts, stop_ids, tokenizer.pad_id, max_new_tokens, batch_size, progress)
        lm = reference_metrics(model, rendered, tokenizer.pad_id, batch_size, progress)
    finally:
        model.train(was_training)
    predictions = [tokenizer.decode(ids).strip() for ids, _ in replies]
    metrics = {k: lm[k] for k in ("loss", "perplexity", "token_accuracy")}
    metrics.update(task_metrics(chosen_task, predictions, references, chosen_lang, rouge_stemmer))
    finished = [done for _, done in replies]
    counts = {"examples": len(examples), "reference_tokens": lm["num_tokens"],
              "unfinished": finished.count(False), "empty_predictions": predictions.count("")}
    settings = {"template": template.to_dict(), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "task_detected": task is None, "lang_detected": lang is None, "rouge_stemmer": rouge_stemmer}
    return EvalResult(chosen_task, chosen_lang, metrics, counts, list(examples), predictions,
                      [exact_match(p, r) for p, r in zip(predictions, references)], finished, settings)


# --- files ------------------------------------------------------------------------------------
def _fenced(text: str) -> str:
    """A Markdown code block that no backtick run inside `text` can close early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _samples_markdown(result: EvalResult, picked: list[int], seed: int, sources: dict[str, Any]) -> str:
    where = " · ".join(f"{k}: `{v}`" for k, v in sources.items() if v is not None)
    lines = [f"# Spot check: {len(picked)} of {len(result.examples)} examples (seed {seed})", "",
             f"Task: {result.task} · lang: {result.lang}" + (f" · {where}" if where else ""), "",
             "Read each sample and tick one verdict (人工抽样评估). \"Exact match\" is the automatic "
             "verdict only: a prediction can be right in other words, or match by luck.", ""]
    for n, i in enumerate(picked, 1):
        e = result.examples[i]
        lines += [f"## {n}. {e.source} line {e.line}: exact match {'yes' if result.matches[i] else 'no'}"
                  + ("" if result.finished[i] else " (cut at max_new_tokens)"), "",
                  "**Prompt**", "", _fenced(e.prompt), "", "**Reference**", "", _fenced(e.response), "",
                  "**Prediction**", "", _fenced(result.predictions[i]), "",
                  "Verdict: [ ] correct  [ ] partly correct  [ ] wrong  Notes:", ""]
    return "\n".join(lines)


def write_report(result: EvalResult, output_dir: Union[str, Path], samples: int = 20, seed: int = 0,
                 sources: Optional[dict[str, Any]] = None) -> tuple[Path, Path]:
    """Write output_dir/metrics.json and output_dir/samples.md; return their paths. The two are
    staged and swapped in together (files.staged_dir): a crash leaves the previous pair, never the
    new metrics beside the old samples.

    samples.md holds min(samples, N) examples drawn with random.Random(seed), in file order.
    sources (e.g. {"model": ..., "adapter": ..., "data": ...}) is recorded in both files.
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    sources = dict(sources or {})
    out = Path(output_dir)
    report = {"task": result.task, "lang": result.lang, **sources,
              "metrics": result.metrics, "counts": result.counts,
              **result.settings, "samples": samples, "seed": seed}
    picked = sorted(random.Random(seed).sample(range(len(result.examples)), min(samples, len(result.examples))))
    with staged_dir(out) as tmp:
        (tmp / "metrics.json").write_bytes(json_bytes(report))  # a perplexity beyond float64 as null
        (tmp / "samples.md").write_text(_samples_markdown(result, picked, seed, sources), encoding="utf-8")
    return out / "metrics.json", out / "samples.md"
