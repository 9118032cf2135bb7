"""`minipeft eval`: generate replies for a test JSONL file and score them (minipeft/evaluate.py).

    minipeft eval [--model DIR] [--adapter DIR] --data TEST.jsonl [--template NAME] [--task TASK]
                  [--lang en|zh|intl] [--rouge-stemmer]
                  [--max-new-tokens N] [--batch-size N] [--output DIR] [--samples N] [--seed N]

Where things come from: the base model from --model, else the shipped one (models/minillama-10m,
the default model of every command); the tokenizer from the adapter directory when it holds tokenizer.model,
else from the model directory; the chat template from --template, else the chat_template.json
the training run saved beside the adapter (or in the model directory), else "plain". The run
writes OUTPUT/metrics.json and OUTPUT/samples.md and prints a table of the metrics.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from .argtypes import at_least, device, nonempty
from .data.loader import load_jsonl
from .distributed import use_device
from .evaluate import LANGS, TASKS, EvalResult, evaluate, write_report
from .files import check_output_dir
from .job import QUANTIZATIONS, default_model_dir, load_trained
from .peft_config import PeftConfig
from .peft_files import adapter_directory
from .templates import TEMPLATE_FILE, TEMPLATES, ChatTemplate, get_template, load_template
from .tokenizer import load_tokenizer
from .train_config import MAX_SEED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _template(name: Optional[str], adapter: Optional[str], model: str) -> tuple[ChatTemplate, str]:
    """(template, where it came from)."""
    if name is not None:
        return get_template(name), "--template"
    for directory in (adapter, model):
        if directory is not None and (Path(directory) / TEMPLATE_FILE).is_file():
            return load_template(directory), str(Path(directory) / TEMPLATE_FILE)
    return get_template("plain"), "default (no chat_template.json found)"


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    return load_trained(str(args.model), args.adapter, DTYPES.get(args.dtype), use_device(args.device),
                        args.quantization, log=print)[0]


def _print_table(result: EvalResult, files: tuple[Path, Path]) -> None:
    detected = " (detected)" if result.settings["task_detected"] else ""
    print(f"task {result.task}{detected}, lang {result.lang}, {result.counts['examples']} examples, "
          f"{result.counts['unfinished']} cut at max_new_tokens")
    width = max(len(k) for k in result.metrics)
    print(f"{'metric':<{width}}  value")
    for key, value in result.metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"wrote {files[0]} and {files[1]}")


def _eval(args: argparse.Namespace) -> int:
    check_output_dir(args.output, "--output")  # before the model loads and generates
    if args.adapter is not None:  # a missing adapter failed only after the base had loaded
        PeftConfig.load(adapter_directory(args.adapter))
    examples = load_jsonl(args.data)
    has_own_tokenizer = args.adapter is not None and (Path(args.adapter) / "tokenizer.model").is_file()
    tokenizer = load_tokenizer(args.adapter if has_own_tokenizer else args.model)
    template, template_source = _template(args.template, args.adapter, args.model)
    print(f"template {template.name} from {template_source}")
    result = evaluate(_load_model(args), tokenizer, examples, template, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, task=args.task, lang=args.lang, rouge_stemmer=args.rouge_stemmer)
    sources = {"model": str(args.model), "adapter": args.adapter, "data": args.data}
    _print_table(result, write_report(result, args.output, samples=args.samples, seed=args.seed, sources=sources))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="generate replies for a test set and score them",
                       description="Generate a reply for every example of a test set, score the replies, "
                       "and write metrics.json and samples.md (a sample for a human to check).")
    p.add_argument("--model", type=nonempty("a model directory"), default=str(default_model_dir()),
                   metavar="DIR",
                   help="Hugging Face model directory (default: the shipped base model, %(default)s)")
    p.add_argument("--adapter", type=nonempty("an adapter directory"), metavar="DIR", help="adapter directory (adapter_config.json + weights)")
    p.add_argument("--data", required=True, type=nonempty("a file"), metavar="FILE", help="test set, JSONL in any minipeft data format")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="chat template (default: the adapter's chat_template.json, else plain)")
    p.add_argument("--task", choices=TASKS, help="which metrics (default: detected from the references)")
    p.add_argument("--lang", choices=LANGS, help="BLEU/ROUGE tokenization (default: detected)")
    p.add_argument("--rouge-stemmer", action="store_true",
                   help="ROUGE compares Porter stems, as rouge-score's use_stemmer (default: off, as there)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, metavar="N")
    p.add_argument("--batch-size", type=at_least(1), default=8, metavar="N")
    p.add_argument("--output", type=nonempty("a directory"), default="eval_results", metavar="DIR",
                   help="where metrics.json and samples.md go (default: ./eval_results)")
    p.add_argument("--samples", type=at_least(0), default=20, metavar="N",
                   help="examples in samples.md (default: 20)")
    # random.Random(-n) draws as random.Random(n): a negative seed would alias another
    p.add_argument("--seed", type=at_least(0, MAX_SEED), default=0, help="seed of the samples.md draw")
    p.add_argument("--device", type=device, default="auto", help="auto (a GPU if torch sees one, else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the base model (default: as stored)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                   help="how the base loads: auto (default: NF4 when the adapter records a QLoRA base), none, nf4")
    p.set_defaults(func=_eval)
