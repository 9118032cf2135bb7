"""Evaluation metrics, pure Python + PyTorch: LM loss/perplexity/accuracy, exact match, BLEU, ROUGE.

Each file holds one metric family and states its formula and the reference it is tested
against (sacrebleu, rouge-score, torch cross_entropy) in tests/test_metrics.py, and for ROUGE-Lsum
and the Porter stemmer (rouge-score, NLTK) in tests/test_rouge.py. The files of ROUGE and exact match
are rouge_metric.py and exact_match_metric.py: the functions `rouge` and `exact_match` exported here
would hide modules of those names (`import minipeft.metrics.rouge as m` reads this package's
attribute, and would give the function).
"""
from .bleu import BleuScore, bleu_tokenize, corpus_bleu
from .exact_match_metric import exact_match, exact_match_accuracy, normalize_answer
from .lm import (IGNORE_INDEX, StreamingLMMetrics, causal_lm_loss, head_loss, perplexity, scored_suffix,
                 token_accuracy)
from .porter import porter_stem
from .rouge_metric import ROUGE_TYPES, RougeScore, rouge, rouge_pair, rouge_tokenize

__all__ = [
    "IGNORE_INDEX", "causal_lm_loss", "head_loss", "scored_suffix", "perplexity", "token_accuracy", "StreamingLMMetrics",
    "normalize_answer", "exact_match", "exact_match_accuracy",
    "BleuScore", "corpus_bleu", "bleu_tokenize",
    "ROUGE_TYPES", "RougeScore", "rouge", "rouge_pair", "rouge_tokenize", "porter_stem",
]
