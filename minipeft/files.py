"""The two file rules every writer and reader here follows.

- Writes are atomic: data goes to a temporary file beside the target, then `os.replace` renames it
  into place, so a reader or a crash never sees half a file; the old file stays until then. The
  data is fsynced before the rename and the directory after it: without that, a power loss can
  persist the rename but not the data, leaving an empty file where the old one was.
- JSON reads fail with the file, line and column, and a missing file says what it was needed for.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Union

PathLike = Union[str, os.PathLike]
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: PathLike, data: Union[str, bytes, Iterable[bytes]]) -> None:
    """Write `data` (text as UTF-8, bytes, or byte chunks streamed) to `path` atomically.

    The file gets the permissions a plain open() would give (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            chunks = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable. POSIX only: Windows cannot open a directory."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(obj: Any) -> bytes:
    """Indented UTF-8 JSON with a final newline: the format of every JSON file written here."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def existing_file(path: PathLike, needed_for: str) -> Path:
    """`path` as a Path, or an error naming it: missing, or a directory where a file is needed."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; {needed_for}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {needed_for}")
    return path


def read_json(path: PathLike, needed_for: str) -> Any:
    """Parse a JSON file; errors name the file (and line and column), and what needed it."""
    path = existing_file(path, needed_for)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
