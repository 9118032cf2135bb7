"""`minipeft data check|report|split`: the command line of the data layer.

`register(subparsers)` adds the `data` command to minipeft's parser (minipeft/cli.py); `main`
runs it on its own. Exit status: 0 clean / done, 1 problems in the data (each printed as
`file:line: field: message` on stdout), 2 a command that cannot run (one line on stderr, no
traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import files
from ..argtypes import at_least, check_file_to_write, nonempty
from ..templates import TEMPLATES, ChatTemplate, get_template
from ..train_config import MAX_SEED
from .check import check_file, default_rejects_path, special_tokens, summary, write_clean
from .dedup import NEAR_THRESHOLD
from .jsonl import check_not_input
from .loader import LoadResult, print_warnings, read_file
from .measure import DEFAULT_TEMPLATE, Encoder
from .problems import UsageError
from .report import TASK_SIZES, build_report
from .report_render import write_report
from .split import check_ratio, split_examples, write_split


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="check, report on and split fine-tuning data (JSONL)",
                                 description=__doc__.splitlines()[0])
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{check,report,split}")
    check = sub.add_parser("check", help="list every problem of data files; optionally write a clean copy")
    check.add_argument("files", nargs="+", type=nonempty("a file"), metavar="FILE")
    check.add_argument("--max-length", type=at_least(1),
                       help="longest example in tokens, as in training, which drops longer ones (needs --tokenizer)")
    check.add_argument("--tokenizer", type=nonempty("a directory"), metavar="DIR", help="tokenizer directory, for --max-length")
    check.add_argument("--template", choices=list(TEMPLATES),
                       help=f"chat template the length is measured with, with --tokenizer (default: {DEFAULT_TEMPLATE})")
    check.add_argument("--drop-invalid", action="store_true", help="write the valid lines to --output")
    check.add_argument("--output", type=nonempty("a file"), metavar="CLEAN.jsonl", help="the clean copy (with --drop-invalid)")
    check.add_argument("--rejects", type=nonempty("a file"), metavar="PATH", help="where rejected lines go (default: CLEAN.rejects.jsonl)")
    check.set_defaults(func=run_check)

    report = sub.add_parser("report", help="write a data-quality report (report.md, report.json)")
    report.add_argument("file", type=nonempty("a file"), metavar="FILE")
    report.add_argument("--test", type=nonempty("a file"), metavar="FILE", help="test set to check for leakage from FILE")
    report.add_argument("--task", choices=list(TASK_SIZES), help="task type, for the data-size advice")
    report.add_argument("--output", type=nonempty("a directory"), metavar="DIR", help="report directory (default: FILE's name + .report)")
    report.add_argument("--tokenizer", type=nonempty("a directory"), metavar="DIR", help="count lengths in tokens (default: characters)")
    report.add_argument("--template", choices=list(TEMPLATES),
                        help=f"chat template, with --tokenizer (default: {DEFAULT_TEMPLATE})")
    report.add_argument("--near-threshold", type=float, default=NEAR_THRESHOLD,
                        help=f"Jaccard similarity of near duplicates (default: {NEAR_THRESHOLD})")
    report.set_defaults(func=run_report)

    split = sub.add_parser("split", help="split into train.jsonl and test.jsonl, no prompt on both sides")
    split.add_argument("file", type=nonempty("a file"), metavar="FILE")
    split.add_argument("--test-ratio", type=float, default=0.1, help="share held out for test: 0.1-0.2")
    split.add_argument("--allow-any-ratio", action="store_true", help="accept a ratio outside 0.1-0.2")
    # random.Random(-n) draws as random.Random(n): a negative seed would alias another
    split.add_argument("--seed", type=at_least(0, MAX_SEED), default=0)
    split.add_argument("--stratify", action="store_true", help="keep each label's share (classification)")
    split.add_argument("--output-dir", type=nonempty("a directory"), metavar="DIR", help="where train/test.jsonl go (default: FILE's folder)")
    split.set_defaults(func=run_split)


def _template(args: argparse.Namespace) -> ChatTemplate:
    """--template's template (DEFAULT_TEMPLATE when left out); it measures lengths in tokens only."""
    if args.template is not None and args.tokenizer is None:
        raise UsageError(f"--template {args.template} renders examples into tokens: it needs --tokenizer DIR "
                         "(without one, lengths are counted in characters and no template is used)")
    return get_template(args.template or DEFAULT_TEMPLATE)


def run_check(args: argparse.Namespace) -> int:
    if bool(args.output) != args.drop_invalid or (args.rejects and not args.output):
        raise UsageError("--drop-invalid, --output CLEAN.jsonl (and optionally --rejects) go together")
    if args.output and len(args.files) > 1:
        raise UsageError("--output writes the clean copy of one FILE; check the files one at a time")
    if (args.max_length is None) != (args.tokenizer is None):
        raise UsageError("--max-length counts tokens with --tokenizer DIR: give both or neither")
    rejects = args.rejects or (default_rejects_path(args.output) if args.output else None)
    for out, flag in ((args.output, "--output"), (rejects, "--rejects")):
        if out:  # refused before the check, which on a large file with a tokenizer takes a while
            check_not_input(out, args.files[0], flag)
            check_file_to_write(out, flag)  # a directory failed after the check, and after --output was written
    template = _template(args)
    tokenizer = _load_tokenizer(args.tokenizer)
    status = 0
    for path in args.files:
        result = check_file(path, tokenizer, args.max_length, template)
        _print_problems(result)
        status = max(status, 1 if result.problems else 0)
    if args.output:
        valid, rejected = write_clean(result, args.output, rejects)
        print(f"wrote {valid} valid line(s) to {args.output} and {rejected} rejected line(s) to {rejects}")
    return status


def run_report(args: argparse.Namespace) -> int:
    if not 0 < args.near_threshold <= 1:
        raise UsageError(f"--near-threshold is a Jaccard similarity in (0, 1], got {args.near_threshold}")
    # A file there (--output report.md, or FILE.report's own name) fails now, named, not as a traceback at the swap.
    out = files.check_output_dir(args.output or Path(args.file).with_suffix(".report"),
                                 "--output" if args.output else "report directory (no --output given)")
    template = _template(args)
    tokenizer = _load_tokenizer(args.tokenizer)
    train = read_file(args.file, special_tokens(tokenizer))
    test = read_file(args.test, special_tokens(tokenizer)) if args.test else None
    if not train.examples:
        _print_problems(train)
        print(f"{args.file}: no valid example to report on")
        return 1
    report = build_report(train, test, args.task, tokenizer, template, args.near_threshold)
    written = write_report(report, out)
    for result in filter(None, (train, test)):
        if result.problems:
            print(f"{summary(result)}: the report covers the valid lines; `minipeft data check` lists the rest")
    if not any(p.suffix == ".png" for p in written):
        print("notice: no length histogram image (matplotlib is not installed: `pip install matplotlib`)")
    dup = report["duplicates"]
    verdicts = ", ".join(f"{r['task']}: {r['verdict']}" for r in report["size"]["rows"])
    print(f"{len(train.examples)} examples ({verdicts}); "
          f"{dup['exact_extra_copies']} exact duplicate copies, {len(dup['near'])} near-duplicate pairs, "
          f"{len(report['accuracy']['label_conflicts'])} conflicting prompts"
          + (f", {report['leakage']['leaked_test_examples']} leaked test examples" if test else ""))
    print("wrote " + ", ".join(map(str, written)))
    return 0


def run_split(args: argparse.Namespace) -> int:
    check_ratio(args.test_ratio, args.allow_any_ratio)
    # A file there fails now, named as such, not at the first write as "File exists".
    out_dir = files.check_output_dir(args.output_dir, "--output-dir") if args.output_dir else Path(args.file).parent
    result = read_file(args.file)
    if result.errors:
        _print_problems(result)
        print(f"split needs a file without errors: fix these, or split the output of `minipeft data check {args.file} "
              "--drop-invalid --output CLEAN.jsonl`")
        return 1
    print_warnings(result)  # they reject no line: every line is split
    train, test = split_examples(result.examples, args.test_ratio, args.seed, args.stratify)
    train_path, test_path = write_split(result, train, test, out_dir)
    share = len(test) / len(result.examples)
    print(f"wrote {len(train)} examples to {train_path} and {len(test)} ({share:.1%}) to {test_path} "
          f"(seed {args.seed}{', stratified by label' if args.stratify else ''})")
    return 0


def _print_problems(result: LoadResult) -> None:
    for p in result.problems:
        print(p)
    print(summary(result))


def _load_tokenizer(path: Optional[str]) -> Optional[Encoder]:
    if path is None:
        return None
    try:
        from minipeft.tokenizer import load_tokenizer
    except ImportError as e:
        raise UsageError(f"--tokenizer needs minipeft.tokenizer, which cannot be imported: {e}") from None
    return load_tokenizer(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m minipeft.data.cli data check FILE` etc., without the rest of minipeft's commands."""
    parser = argparse.ArgumentParser(prog="minipeft")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, KeyError) as e:
        # A command that cannot run says why in one line; bad data never gets here (exit status 1).
        print(f"minipeft data {args.data_command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
