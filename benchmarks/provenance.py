"""What a benchmark's saved results record about the code they measured."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional


def git_commit() -> str:
    """HEAD's short hash, with " (dirty)" when files differ from it, or "no commit". git is asked in
    this folder: in the caller's working directory it would name another repository's commit, or
    none, when a script runs from elsewhere (python /path/to/benchmarks/param_count.py)."""
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "--short", "HEAD") or "no commit"
    return commit + " (dirty)" if git("status", "--porcelain") else commit


def cpu_name() -> str:
    """The CPU's model name (Linux), else its architecture: the ratios differ from one host to another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
