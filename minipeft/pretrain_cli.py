"""`minipeft pretrain`: its flags are PretrainConfig's fields (pretrain.py), plus the corpus source,
the output directory, the training length (--steps, --epochs or --max-minutes) and --threads."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from .argtypes import MAX_COUNT, at_least, check_file_to_write, device, finite_float, nonempty
from .corpus import build_corpus, read_corpus, write_corpus
from .distributed import use_device
from .files import check_output_dir, json_bytes, write_atomic
from .pretrain import PretrainConfig, init_architecture, pretrain
from .tokenizer import load_tokenizer


def _command(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    fields = {k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__ if getattr(args, k) is not None}
    if args.init:  # check the settings against the architecture the run will have
        fields.update(init_architecture(args.init))
    cfg = PretrainConfig(**fields)  # bad settings fail here, before the corpus is read
    use_device(cfg.device)  # and a GPU the machine lacks
    # and where the run writes: extracting the corpus takes seconds to minutes
    check_output_dir(args.output, "--output")
    if args.save_corpus:
        check_file_to_write(args.save_corpus, "--save-corpus")
    if args.tokenizer:  # a bad one failed inside the run, leaving OUTPUT.failed behind
        load_tokenizer(args.tokenizer)
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = build_corpus(args.html_dir) if args.html_dir else read_corpus(args.corpus)
    if args.save_corpus:
        write_corpus(docs, args.save_corpus)
    results = pretrain(docs, args.output, cfg, epochs=args.epochs,
                       max_minutes=args.max_minutes, tokenizer_dir=args.tokenizer, init=args.init)
    results["wall_seconds"] = time.perf_counter() - t0  # the whole command: corpus extraction included
    if sys.argv[1:2] == ["pretrain"]:  # run from a shell (not cli.main(argv) in a test): record how
        results["command"] = shlex.join(["minipeft", *sys.argv[1:]])
    write_atomic(Path(args.output) / "pretrain_results.json", json_bytes(results))
    held_out = (f"held-out loss {results['eval_loss']:.4f} (perplexity {results['eval_perplexity']:.2f})"
                if "eval_loss" in results else "no held-out split")
    print(f"wrote {args.output}: {results['parameters']:,} parameters, {results['steps']} steps, "
          f"{results['tokens_seen']:,} tokens seen, {held_out}, {results['wall_seconds'] / 60:.1f} min")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a small LLaMA model (and its tokenizer) from HTML pages or text")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--html-dir", type=nonempty("a folder"), metavar="DIR", help="folder of HTML pages (e.g. /usr/share/doc/python3.11/html)")
    src.add_argument("--corpus", type=nonempty("a file"), metavar="FILE", help="UTF-8 corpus file, documents separated by form-feed lines")
    p.add_argument("--output", required=True, type=nonempty("a directory"), metavar="DIR", help="Hugging Face model directory to write")
    p.add_argument("--save-corpus", type=nonempty("a file"), metavar="FILE", help="also write the extracted corpus here")
    start = p.add_mutually_exclusive_group()  # --init brings its own tokenizer: a --tokenizer beside it went unused
    start.add_argument("--tokenizer", type=nonempty("a directory"), metavar="DIR", help="use this tokenizer instead of training one")
    start.add_argument("--init", type=nonempty("a directory"), metavar="DIR", help="continue pretraining this model (weights, architecture, tokenizer)")
    d = PretrainConfig()
    ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "context_length", "eval_windows", "batch_size",
            "evaluations", "seed")
    floats = ("eval_fraction", "copy_fraction", "drill_fraction", "learning_rate", "warmup_ratio", "weight_decay",
              "adam_beta2")
    for name in ints + floats:
        kind = int if name in ints else float
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, metavar="N" if kind is int else "X",
                       help="default 2.75 x hidden size, rounded up to a multiple of 32" if name == "intermediate_size"
                       else f"default {getattr(d, name)}")
    p.add_argument("--lr-scheduler-type", dest="lr_scheduler_type", metavar="NAME",
                   help=f"default {d.lr_scheduler_type} (any of the trainer's: linear, constant_with_warmup, ...)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps (default {d.steps})")
    length.add_argument("--epochs", type=finite_float(0.0, above=True), metavar="E", help="passes over the text's training windows (drills come on top)")
    length.add_argument("--max-minutes", type=finite_float(0.0, above=True), metavar="M", help="as many steps as fit M minutes (measured)")
    p.add_argument("--device", type=device, metavar="NAME",
                   help="auto (default: a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=at_least(1, MAX_COUNT), metavar="N",
                   help="torch CPU threads (default: torch's). On cores shared with other jobs use 1: threads "
                        "that wait for each other at every op were 3-5x slower than one thread there")
    p.set_defaults(func=_command)
