"""store:sqlite, the embedded default: one database file, durable before a Set is acknowledged.

WAL journal with synchronous=FULL: a commit returns once its WAL frames are fsynced, so an
acknowledged Set survives `kill -9` and a power cut, and a Set cut short is rolled back whole on
the next open. A file at store_path that is not this store's (another SQLite database, anything
else, a corrupt one) fails the load and is left untouched: nothing is written to a file before
its header and meta table say it is ours. One file serves one process (use store:postgres for
several replicas).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence

import numpy as np

from core.errors import ModelFileError
from store.base import STORE_FORMAT, STORE_VERSION, Store, check_dimension, key_digest, last_of_each

SQLITE_HEADER = b"SQLite format 3\x00"
PAGE_SIZE = 16384
SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # digest: store.base.key_digest of key, the exact-key identity (a 16-byte index entry rather
    # than one on the 2 KB key itself).
    "CREATE TABLE entries (digest BLOB PRIMARY KEY, key BLOB NOT NULL, value BLOB NOT NULL)",
)
UPSERT = (
    "INSERT INTO entries (digest, key, value) VALUES (?, ?, ?)"
    " ON CONFLICT (digest) DO UPDATE SET key = excluded.key, value = excluded.value"
)


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._conn = _open(path)
        try:
            self._load()
        except BaseException:
            self._conn.close()
            raise

    def _load(self) -> None:
        conn = self._conn
        try:
            (count,) = conn.execute("SELECT count(*) FROM entries").fetchone()
            (first,) = conn.execute("SELECT length(key) FROM entries LIMIT 1").fetchone() or (0,)
            rows = np.empty((count, first // 4), dtype=np.float32)
            digests: list[bytes] = []
            values: list[bytes] = []
            for i, (digest, key, value) in enumerate(conn.execute("SELECT digest, key, value FROM entries")):
                if len(key) != first or i >= count:
                    raise ModelFileError(f"store_path {self.path}: keys of several lengths: not written by this store")
                rows[i] = np.frombuffer(key, dtype="<f4")
                digests.append(digest)
                values.append(value)
        except sqlite3.DatabaseError as error:
            raise ModelFileError(f"store_path {self.path}: corrupt database ({error}); it was left as it is") from None
        self.index.replace_all(rows, digests, values)

    def describe(self) -> str:
        return f"sqlite store {self.path}: {len(self.index)} keys" + (
            f" of {self.index.dim} floats" if self.index.dim else ""
        )

    def set(self, rows: np.ndarray, values: Sequence[bytes]) -> None:
        rows, digests, unique_values = last_of_each(rows, values)
        with self._write_lock:
            check_dimension(self.index.dim, rows, "Keys")
            self._write(UPSERT, [(d, r.astype("<f4").tobytes(), v) for d, r, v in zip(digests, rows, unique_values)])
            self.index.upsert(rows, digests, unique_values)

    def delete(self, rows: np.ndarray) -> None:
        digests = [key_digest(row) for row in rows]
        with self._write_lock:
            check_dimension(self.index.dim, rows, "Keys")
            self._write("DELETE FROM entries WHERE digest = ?", [(d,) for d in digests])
            self.index.delete(digests)

    def _write(self, statement: str, parameters: list[tuple]) -> None:
        """One transaction, committed (fsynced) before it returns, or rolled back whole."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(statement, parameters)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


def _open(path: str) -> sqlite3.Connection:
    """A connection to this store's database at path, created when no file (or an empty one) is
    there; ModelFileError for anything else at path, which stays as it was."""
    exists = os.path.exists(path)
    if exists and not os.path.isfile(path):
        raise ModelFileError(f"store_path {path}: not a regular file")
    new = not exists or os.path.getsize(path) == 0
    if not new:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise ModelFileError(
                f"store_path {path}: not a SQLite database (not a face store); it was left as it is:"
                " give store_path another file"
            )
    elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ModelFileError(f"store_path {path}: its directory does not exist")
    # isolation_level=None: transactions are the explicit BEGIN/COMMIT in _write, nothing implicit.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if new:
            # A 512-d key is a 2 KB row: 4 KB pages hold one row each (half of the file empty),
            # 16 KB pages hold seven.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?)", [("format", STORE_FORMAT), ("version", STORE_VERSION)]
            )
            conn.execute("COMMIT")
        else:
            _check_ours(conn, path)
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.DatabaseError as error:
        conn.close()
        raise ModelFileError(f"store_path {path}: corrupt database ({error}); it was left as it is") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _check_ours(conn: sqlite3.Connection, path: str) -> None:
    """ModelFileError unless the database declares this store's format and version and is intact;
    reads only."""
    try:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    except sqlite3.OperationalError:  # no meta table: another application's database
        meta = {}
    if meta.get("format") != STORE_FORMAT:
        raise ModelFileError(
            f"store_path {path}: a SQLite database of another application (no {STORE_FORMAT} meta);"
            " it was left as it is: give store_path another file"
        )
    if meta.get("version") != STORE_VERSION:
        raise ModelFileError(
            f"store_path {path}: store format version {meta.get('version')!r}, this backend reads {STORE_VERSION}"
        )
    (verdict,) = conn.execute("PRAGMA quick_check(1)").fetchone()
    if verdict != "ok":
        raise ModelFileError(f"store_path {path}: corrupt database ({verdict}); it was left as it is")
