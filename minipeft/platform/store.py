"""The platform's state in SQLite (DATA_DIR/platform.db): files, jobs, models, deployments.

Every change is one committed transaction, so a server killed at any instant restarts with every
upload, job, model and deployment it acknowledged (tests/test_platform.py kills one mid-queue).
One connection is shared by the request threads and the scheduler thread behind a lock: SQLite
serializes writers anyway, and a platform's bookkeeping traffic is small. Table and column names
come from TABLES only, never from a request; values are always bound parameters.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..files import strict_json

# table -> columns (the first is the key). Columns in JSON_COLUMNS hold JSON text.
TABLES: dict[str, tuple[str, ...]] = {
    "files": ("id", "filename", "purpose", "bytes", "lines", "format", "created_at"),
    "jobs": ("id", "model", "base_model", "training_type", "hyper_parameters", "training_file_ids",
             "validation_file_ids", "config", "status", "error", "fine_tuned_model", "resumes", "created_at",
             "started_at", "finished_at", "interruptions"),
    "models": ("name", "job_id", "base_model", "weights_dir", "adapter_dir", "method", "checkpoint", "created_at"),
    "deployments": ("name", "model", "created_at"),
}
JSON_COLUMNS = {"hyper_parameters", "training_file_ids", "validation_file_ids", "config"}
# Columns added after the first release -> the value rows without one take (an integer: an SQL
# literal as is). A platform.db written before gets them when opened, so a data directory survives
# an upgrade; rows inserted without one get it too.
ADDED = {"interruptions": 0}


def new_id(prefix: str) -> str:
    """prefix-<timestamp>-<random>: sortable by creation, unguessable, safe as a file name."""
    return f"{prefix}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"


def _declared(column: str) -> str:
    return f"{column} DEFAULT {ADDED[column]}" if column in ADDED else column


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        for table, columns in TABLES.items():
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns[0]} TEXT PRIMARY KEY, "
                             + ", ".join(map(_declared, columns[1:])) + ")")
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {_declared(column)}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _encode(table: str, row: dict[str, Any]) -> dict[str, Any]:
        unknown = set(row) - set(TABLES[table])
        if unknown:
            raise KeyError(f"{table} has no column(s) {sorted(unknown)}")
        return {k: strict_json(v, indent=None) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}

    @staticmethod
    def _decode(table: str, values: tuple) -> dict[str, Any]:
        row = dict(zip(TABLES[table], values))
        return {k: json.loads(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}

    def insert(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        encoded = self._encode(table, row)
        names = ", ".join(encoded)
        with self._lock:
            self._db.execute(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(encoded))})",
                             tuple(encoded.values()))
        return self.get(table, row[TABLES[table][0]])

    def get(self, table: str, key: str) -> Optional[dict[str, Any]]:
        with self._lock:
            found = self._db.execute(f"SELECT {', '.join(TABLES[table])} FROM {table} "
                                     f"WHERE {TABLES[table][0]} = ?", (key,)).fetchone()
        return None if found is None else self._decode(table, found)

    def _where(self, table: str, where: dict[str, Any]) -> tuple[str, list[Any]]:
        """The WHERE clause (or "") and its parameters: columns equal to `where` (a tuple: any of them)."""
        self._encode(table, where)
        clauses, params = [], []
        for column, value in where.items():
            values = value if isinstance(value, tuple) else (value,)
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            params += values
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        """Rows whose columns equal `where` (a tuple value: any of them), oldest first."""
        clause, params = self._where(table, where)
        with self._lock:
            found = self._db.execute(f"SELECT {', '.join(TABLES[table])} FROM {table}{clause} "
                                     "ORDER BY created_at, rowid", params).fetchall()
        return [self._decode(table, r) for r in found]

    def page(self, table: str, offset: int, limit: int, **where: Any) -> tuple[list[dict[str, Any]], int]:
        """The rows rows() selects, newest first: `limit` of them from `offset` on, and their total
        (read together, so a row added meanwhile cannot make them disagree)."""
        clause, params = self._where(table, where)
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM {table}{clause}", params).fetchone()[0]
            found = self._db.execute(f"SELECT {', '.join(TABLES[table])} FROM {table}{clause} "
                                     "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                                     [*params, limit, offset]).fetchall()
        return [self._decode(table, r) for r in found], total

    def update(self, table: str, key: str, fields: dict[str, Any], when_status: tuple[str, ...] = ()) -> bool:
        """Set `fields` on row `key` (only while its status is one of `when_status`, if given): a
        conditional update is how two threads racing over one job cannot both win. True if changed."""
        encoded = self._encode(table, fields)
        sql = f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in encoded)} WHERE {TABLES[table][0]} = ?"
        params = [*encoded.values(), key]
        if when_status:
            sql += f" AND status IN ({', '.join('?' * len(when_status))})"
            params += when_status
        with self._lock:
            return self._db.execute(sql, params).rowcount == 1

    def delete(self, table: str, key: str) -> bool:
        with self._lock:
            return self._db.execute(f"DELETE FROM {table} WHERE {TABLES[table][0]} = ?", (key,)).rowcount == 1
