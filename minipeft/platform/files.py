"""Uploaded training files: size-limited, checked by the data checker, stored by id.

An upload is copied (at most `limit` bytes) to DATA_DIR/files/.<id>.upload, checked with
minipeft.data.check_file, and renamed to DATA_DIR/files/<id>.jsonl only if it is clean: a file
that training would reject is rejected now, with the same file:line:field problems. The name the
client sent is kept for display only (its last path component, control characters removed); it
never becomes part of a path, so "../../etc/passwd" is just a label. A server killed during an
upload leaves its .<id>.upload behind, or, killed between the rename and the record, a <id>.jsonl
no record names (nor can: its id never reached the client): the next one removes both when it starts.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

from ..data import check_file
from ..files import fsync_dir
from .errors import ApiError, not_found
from .store import Store, new_id

MAX_PROBLEMS_SHOWN = 50
CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PARTIAL = ".{}.upload"  # the name of an upload (by its id) not yet checked and renamed into place


def display_name(filename: str) -> str:
    """The upload's name as a label: last path component (POSIX or Windows), printable, <= 255 chars."""
    name = PureWindowsPath(PurePosixPath(filename or "").name).name
    return _CONTROL.sub("", name)[:255] or "upload.jsonl"


def _copy_bounded(source: BinaryIO, target: Path, limit: int) -> int:
    """Copy at most `limit` bytes, fsynced: the file is renamed into place and recorded after this,
    and without it a power loss could keep both but not the data (minipeft.files' rule)."""
    size = 0
    with open(target, "wb") as out:
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"file is larger than the upload limit of {limit} bytes", param="file")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


def save_upload(store: Store, data_dir: Path, filename: str, source: BinaryIO, limit: int) -> dict[str, Any]:
    """Store a JSONL upload and return its record, plus its typo warnings (they reject no
    line, so the file is stored) as file:line: key: message. One with errors
    raises ApiError (400 with every problem found, up to MAX_PROBLEMS_SHOWN, in the same form)."""
    name = display_name(filename)
    file_id = new_id("file")
    folder = data_dir / "files"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / PARTIAL.format(file_id)
    try:
        size = _copy_bounded(source, tmp, limit)
        result = check_file(tmp)
        if result.errors:
            problems = [str(dataclasses.replace(p, path=name)) for p in result.problems]
            shown = problems[:MAX_PROBLEMS_SHOWN]
            more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
            raise ApiError(400, f"{name} is not a valid fine-tuning JSONL file: {len(problems)} problem(s):\n  "
                           + "\n  ".join(shown) + more, param="file",
                           detail={"problems": shown, "count": len(problems)})
        os.replace(tmp, folder / f"{file_id}.jsonl")
        fsync_dir(folder)  # the rename durable before the record that points at it
    finally:
        tmp.unlink(missing_ok=True)
    record = store.insert("files", {"id": file_id, "filename": name, "purpose": "fine-tune", "bytes": size,
                                    "lines": len(result.lines), "format": result.format,
                                    "created_at": int(time.time())})
    return {**record, "warnings": [str(dataclasses.replace(p, path=name)) for p in result.warnings]}


def remove_partial_uploads(store: Store, data_dir: Path) -> None:
    """Delete the uploads a crash cut short: temp files, and stored files without a record (a
    crash between the rename and the insert, or within delete_file). Only at start, when no upload
    can be under way; ids are new_id("file"), so other files in the folder are not ours to touch."""
    folder = data_dir / "files"
    for path in folder.glob(PARTIAL.format("file-*")):
        path.unlink(missing_ok=True)
    for path in folder.glob("file-*.jsonl"):
        if store.get("files", path.stem) is None:
            path.unlink(missing_ok=True)


def file_path(store: Store, data_dir: Path, file_id: str) -> Path:
    """The stored file of `file_id` (404 if there is no such file)."""
    if store.get("files", file_id) is None:
        raise not_found("file", file_id, "upload it with POST /api/v1/files")
    return data_dir / "files" / f"{file_id}.jsonl"


def delete_file(store: Store, data_dir: Path, file_id: str) -> None:
    """Jobs keep their own copy of their data, so a file can go even while a job that used it runs."""
    path = file_path(store, data_dir, file_id)
    store.delete("files", file_id)
    path.unlink(missing_ok=True)
