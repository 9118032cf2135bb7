"""Fine-tuning data (the outline's section 3): JSONL formats normalized to chat messages
(formats.py, loader.py), validation (check.py), a quality report (report.py) and a
leakage-free train/test split (split.py); `minipeft data ...` on the command line (cli.py)."""
from .check import check_file, write_clean
from .formats import FORMATS, Example
from .loader import LoadResult, load_jsonl, read_file
from .problems import DataError, Problem, UsageError
from .report import build_report
from .report_render import write_report
from .split import split_examples, write_split

__all__ = ["Example", "FORMATS", "DataError", "Problem", "UsageError", "LoadResult", "load_jsonl", "read_file",
           "check_file", "write_clean", "build_report", "write_report", "split_examples", "write_split"]
