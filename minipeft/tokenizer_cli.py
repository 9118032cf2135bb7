"""`minipeft tokenizer train`: a SentencePiece tokenizer directory from text files (tokenizer.train_tokenizer)."""
from __future__ import annotations

import argparse

from .argtypes import MAX_COUNT, at_least, fraction, nonempty
from .files import check_output_dir
from .tokenizer import CHAT_TOKENS, train_tokenizer


def _train_command(args: argparse.Namespace) -> int:
    check_output_dir(args.output, "--output")  # before training, which can take minutes
    tok = train_tokenizer(args.input, args.output, args.vocab_size, model_type=args.model_type,
                          special_tokens=args.special_tokens, character_coverage=args.character_coverage)
    print(f"wrote {args.output}: {tok.vocab_size} pieces ({args.model_type}), bos={tok.bos_id} eos={tok.eos_id} "
          f"pad={tok.pad_id}, special tokens {list(tok.special_tokens)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    commands = p.add_subparsers(dest="tokenizer_command", required=True)
    t = commands.add_parser("train", help="train tokenizer.model from text files into a tokenizer directory")
    t.add_argument("--input", nargs="+", required=True, type=nonempty("a file"), metavar="FILE", help="UTF-8 text files, one text a line")
    t.add_argument("--output", required=True, type=nonempty("a directory"), metavar="DIR", help="directory for tokenizer.model + configs")
    t.add_argument("--vocab-size", type=at_least(1, MAX_COUNT), required=True, metavar="N")
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--character-coverage", type=fraction, default=0.9995, help="in (0, 1]")
    t.add_argument("--special-tokens", nargs="*", type=nonempty("a token"), default=list(CHAT_TOKENS), metavar="TOKEN",
                   help="tokens that always encode as one id (default: the ChatML tokens)")
    t.set_defaults(func=_train_command)
