"""The two file rules every writer and reader here follows.

- Writes are atomic: data goes to a temporary file beside the target, then `os.replace` renames it
  into place, so a reader or a crash never sees half a file; the old file stays until then. The
  data is fsynced before the rename and the directory after it: without that, a power loss can
  persist the rename but not the data, leaving an empty file where the old one was. A directory
  is built in a staging directory beside it and renamed the same way, its files and itself
  fsynced first (fsync_tree) and the parent after.
- JSON is strict both ways: written without NaN or Infinity (strict_json), read failing with the
  file, line and column, and a missing file says what it was needed for.

An output directory is checked before the expensive work (`check_output_dir`), so that a path that
cannot be written fails in a second rather than after a model has loaded.
"""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

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
    fsync_dir(path.parent)


def staging_dir(path: PathLike) -> Path:
    """A new empty hidden directory beside `path` (its parents created) to build `path`'s contents
    in: being on the same filesystem, it can then be renamed into place. Its mode is a plain
    mkdir's (0777 less the umask), not mkdtemp's 0700, so the renamed directory is like any other."""
    path = Path(path).resolve()  # "." has no name, and its parent is itself
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


# write_atomic's file .NAME.XXXXXXXX.tmp and staging_dir's directory .NAME.tmpXXXXXXXX (XXXXXXXX: tempfile's
# random characters).
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|tmp[a-z0-9_]{8})")


def temp_target(name: str) -> Optional[str]:
    """The name of the file or directory that `name` is write_atomic's or staging_dir's temporary
    for, else None: what a process killed mid-write leaves beside its target (no cleanup ran)."""
    match = _TEMP_NAME.fullmatch(name)
    return match["name"] if match else None


def replace_dir(tmp: Path, path: PathLike, stale: Optional[str] = None) -> None:
    """Move the finished directory `tmp` (from staging_dir) into `path`. Other entries already in
    `path` (a tokenizer, a model card, other adapters) stay, but for those matching the glob `stale`
    that the new contents do not have (a model's old shards: checkpoint.WEIGHT_FILES).

    The directory is swapped whole, not filled file by file: a crash between two per-file moves
    left a mix that loads without an error, the new config.json beside the old weights, or an old
    shard index (which loading prefers) beside the new model.safetensors. So what stays is linked
    into `tmp` first, then the directories are swapped in one step (Linux's renameat2), or, where
    that is not offered, by two renames: a crash between those leaves `path` absent and its old
    contents whole in the hidden directory beside it, never half of each.
    Two kinds of folder are filled file by file instead: the working directory (save_pretrained("."),
    or a folder above it: renamed away, the process and the shell would be left in a deleted one),
    and a folder holding subfolders the new contents do not replace (a folder of other work, not a
    model's: its trees would have to be relinked). The files are fsynced before the rename and the
    parent directory after (write_atomic)."""
    fsync_tree(tmp)
    path = Path(path).resolve()  # a symlink swaps the directory it names; "." gets a name
    if not path.exists():
        os.replace(tmp, path)
    else:
        new = {e.name for e in tmp.iterdir()}
        dropped = [e for e in path.iterdir() if e.name not in new and stale and fnmatch.fnmatch(e.name, stale)]
        kept = [e for e in path.iterdir() if e.name not in new and e not in dropped]
        if Path.cwd().is_relative_to(path) or any(e.is_dir() for e in kept):
            _move_into(tmp, path, dropped)
        else:
            _swap(tmp, path, kept)
    fsync_dir(path.parent)


@contextmanager
def staged_dir(path: PathLike, stale: Optional[str] = None) -> Iterator[Path]:
    """`with staged_dir(path) as tmp:` write the directory's files into tmp; at the end of the block
    they replace `path` (replace_dir), and on an exception tmp is removed and `path` left as it was."""
    tmp = staging_dir(path)
    try:
        yield tmp
        replace_dir(tmp, path, stale)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: Path, path: Path, kept: list[Path]) -> None:
    for entry in kept:  # files only (replace_dir): a hard link, or a copy where links fail
        try:
            os.link(entry, tmp / entry.name, follow_symlinks=False)
        except OSError:
            shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
    if _exchange(tmp, path):  # no moment without `path`; tmp now holds the old contents
        shutil.rmtree(tmp)
        return
    old = staging_dir(path)  # an empty directory: a directory may be renamed over it
    try:
        os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if path.exists():  # the first rename failed
            old.rmdir()
        else:
            os.replace(old, path)  # the previous contents back in place
        raise
    shutil.rmtree(old)


def _load_renameat2() -> Optional[Callable[..., int]]:
    """glibc's renameat2 (2.28 and later), else None: another OS or C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories a and b atomically (renameat2's RENAME_EXCHANGE): os.replace cannot put
    a directory over a non-empty one, so without it a swap takes two renames and a crash between
    them leaves b missing. False where the OS, C library or filesystem (EINVAL, ENOSYS, EOPNOTSUPP)
    cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _move_into(tmp: Path, path: Path, dropped: list[Path]) -> None:
    for f in tmp.iterdir():
        if (path / f.name).is_dir() and not (path / f.name).is_symlink():
            shutil.rmtree(path / f.name)  # os.replace cannot put a folder over a non-empty one
        os.replace(f, path / f.name)  # atomic per file on one filesystem
    for old in dropped:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    tmp.rmdir()


def check_output_dir(path: PathLike, name: str) -> Path:
    """`path` as a Path if it can serve as an output directory (an existing directory, or one that
    can be created), else a ValueError that names it as `name`, the setting or flag the user wrote
    ("output_dir", "--output"), and says why: it exists and is not a directory, an ancestor is a
    file, or it cannot be created or written.

    Creates nothing: writability is proven by a directory made and removed at once in `path` or
    its nearest existing ancestor, since permission bits answer yes to root even where a write
    fails (/sys refuses mkdir to root too)."""
    path = Path(path)
    ancestor = path
    while not (ancestor.exists() or ancestor.is_symlink()):  # a dangling symlink blocks mkdir too
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        why = "exists" if ancestor == path else f"cannot be created: {ancestor} exists"
        raise ValueError(f"{name} {path}: {why} and is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-check."))
    except OSError as e:
        why = "is not writable" if ancestor == path else f"cannot be created in {ancestor}"
        raise ValueError(f"{name} {path}: {why} ({e.strerror})") from None
    return path


def fsync_tree(directory: PathLike) -> None:
    """fsync every file under `directory` and every directory, itself included: a staged directory's
    data on disk before the rename that publishes it, as write_atomic's file (a checkpoint renamed
    into place lets rotation delete the one before it: after a power loss it must not be empty)."""
    for root, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable. POSIX only: Windows cannot open a directory."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strict_json(obj: Any, indent: Optional[int] = 2) -> str:
    """obj as strict JSON (RFC 8259), the text of every JSON file and JSONL line written here: a float
    that is not finite becomes null. Python's json writes NaN and Infinity by default, which other
    readers (JavaScript, jq, a FastAPI response) reject; a perplexity past float64's range is one."""
    return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_bytes(obj: Any) -> bytes:
    """Indented strict JSON (strict_json) in UTF-8 with a final newline: a JSON file written here."""
    return (strict_json(obj) + "\n").encode("utf-8")


def existing_file(path: PathLike, needed_for: str) -> Path:
    """`path` as a Path, or an error naming it: missing, or a directory where a file is needed.
    Not only a regular file: a pipe (`--config <(cat job.yaml)`, /dev/stdin) or a device is taken
    too. Such a file can be read once only, so whoever reads it reads it once (parse_json)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; {needed_for}")
    if not path.exists():  # a dangling symlink too
        raise FileNotFoundError(f"{path}: missing; {needed_for}")
    return path


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`; bytes that are not UTF-8 are an error naming the file and the byte
    (a bare UnicodeDecodeError names neither)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_json(path: PathLike, needed_for: str, unique_keys: bool = False) -> Any:
    """Parse a JSON file; errors name the file (and line and column), and what needed it.
    unique_keys: a key given twice in one object is an error naming it (json keeps the last one
    silently: a settings file whose second value overrides the first the reader saw)."""
    path = existing_file(path, needed_for)
    return parse_json(read_text(path), path, unique_keys)


def parse_json(text: str, path: PathLike, unique_keys: bool = False) -> Any:
    """read_json's parse of `text`, which the caller read from `path` (its errors name it): a file
    looked at before it is parsed, where a pipe cannot be read a second time."""

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{path}: key {key!r} given twice; keep one")
            seen.add(key)
        return dict(pairs)

    hook = refuse_duplicates if unique_keys else None
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
