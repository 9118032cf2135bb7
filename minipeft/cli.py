"""The `minipeft` command. Each subcommand lives beside the concept it drives; this file only
collects them: a module in COMMANDS exposes `register(subparsers)`, which adds its parser and
sets `func` (args -> exit status). USER_ERRORS are the errors that print one line instead of a
traceback; the subcommands' shared argparse types are in argtypes.py. A reader that closes the
output early (`minipeft job status ID | head -1`) ends the command quietly, with status 1, as
Python's documentation advises for SIGPIPE; a user error keeps its status 2 even where no one
reads its message."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence, TextIO

from .trainer import TrainingDiverged

COMMANDS = [
    "minipeft.generate_cli",
    "minipeft.tokenizer_cli",
    "minipeft.data.cli",
    "minipeft.train_cli",
    "minipeft.param_count",
    "minipeft.demo",
    "minipeft.eval_cli",
    "minipeft.pretrain_cli",
    "minipeft.datasets",
    "minipeft.platform.cli",
]
# A bad file, field or value; a run that diverged (its message says what to change).
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TrainingDiverged)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipeft", description="parameter-efficient fine-tuning, from scratch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    status = 0
    try:
        try:
            status = _run(argv)
        except SystemExit:  # argparse's --help and usage errors: their output is flushed here too
            sys.stdout.flush()
            raise
        # A reader gone away is found here, in the try, rather than by the flush at exit. Not in a
        # `finally`: its BrokenPipeError would replace a crash in flight, traceback and all.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _to_devnull(sys.stdout)
        return status or 1  # 1 is Python's own status on EPIPE; a user error keeps its 2


def _run(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        try:
            print(f"{command_name(parser, args)}: error: {e}", file=sys.stderr)
        except BrokenPipeError:  # `2>&1 | head -0`: unread, but the status still says it was the input
            _to_devnull(sys.stderr)
        return 2


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that ran, nested subcommands included ("minipeft data check"), as argparse's own
    errors name it: its prog."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) is None:
            return parser.prog
        parser = sub.choices[getattr(args, sub.dest)]


def _to_devnull(stream: TextIO) -> None:
    """The signal module's documented recipe for a closed pipe: the flush at exit would fail again
    (and print "Exception ignored", or turn the status into 120), so the stream points at devnull."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


if __name__ == "__main__":
    sys.exit(main())
