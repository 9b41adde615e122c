"""store:postgres: Postgres is the source of truth for several replicas of this backend, each
answering Get and Find from its own in-memory matrix (the shape CompreFace runs: Postgres plus
brute force in memory, replicas synced by LISTEN/NOTIFY).

Every write takes one advisory lock, so writes commit one at a time and each logs its keys'
digests under the next sequence number in face_store_changes (commit order = sequence order) and
notifies CHANNEL. A replica applies changes in sequence order from that log, reading each touched
key's current row (present: upsert; gone: delete), so replicas converge on the table whatever the
interleaving. The writing replica applies its own change before acknowledging (read your writes);
the others on the notification, within milliseconds, and at least every POLL_SECONDS should one be
lost. A replica that fell behind the pruned log, or restarts, reloads everything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import InvalidInputError, ModelFileError, StoreUnavailableError

if TYPE_CHECKING:
    import psycopg

from store.base import STORE_FORMAT, STORE_VERSION, Store, check_dimension, key_digest, last_of_each

log = logging.getLogger(__name__)

CHANNEL = "face_store_changes"
# pg_advisory_xact_lock key of the writers (any constant; "face" in ASCII).
WRITE_LOCK = 0x66616365
# Changes kept for replicas that miss notifications for a while; one further behind reloads.
RETAIN_CHANGES = 100_000
POLL_SECONDS = 5.0
NOTIFY_WAIT_SECONDS = 0.5  # how long the listener waits for a notification before checking for close
SCHEMA = (
    "CREATE TABLE face_store_meta (name text PRIMARY KEY, value text NOT NULL)",
    # digest: store.base.key_digest of key, the exact-key identity.
    "CREATE TABLE face_store_entries (digest bytea PRIMARY KEY, key bytea NOT NULL, value bytea NOT NULL)",
    "CREATE TABLE face_store_changes (seq bigint PRIMARY KEY, digests bytea[] NOT NULL)",
)
UPSERT = (
    "INSERT INTO face_store_entries (digest, key, value) VALUES (%s, %s, %s)"
    " ON CONFLICT (digest) DO UPDATE SET key = EXCLUDED.key, value = EXCLUDED.value"
)


def _unavailable(what: str, error: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(f"postgres store: {what}: {str(error).strip().splitlines()[0]}")


class PostgresStore(Store):
    kind = "postgres"

    def __init__(self, dsn: str) -> None:
        import psycopg

        super().__init__()
        self._dsn = dsn
        self._seen = 0  # the last change applied to the index
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self._writer = psycopg.connect(dsn)
            self._reader = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as error:
            raise _unavailable("cannot connect (store_dsn)", error) from None
        try:
            self._create_or_check()
            self._reload()
        except psycopg.Error as error:
            self._close_connections()
            raise _unavailable("cannot read the store", error) from None
        except BaseException:
            self._close_connections()
            raise
        info = self._writer.info
        self._where = f"{info.host}:{info.port}/{info.dbname}"
        self._listener = threading.Thread(target=self._listen, name="store-listener", daemon=True)
        self._listener.start()

    # -- schema and loading --------------------------------------------------------------------
    def _create_or_check(self) -> None:
        with self._writer.transaction(), self._writer.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            cur.execute("SELECT to_regclass('face_store_meta'), to_regclass('face_store_entries')")
            meta_table, entries_table = cur.fetchone() or (None, None)
            if meta_table is None and entries_table is None:
                for statement in SCHEMA:
                    cur.execute(statement)
                cur.executemany(
                    "INSERT INTO face_store_meta (name, value) VALUES (%s, %s)",
                    [("format", STORE_FORMAT), ("version", STORE_VERSION)],
                )
                return
            meta: dict[str, str] = {}
            if meta_table is not None:
                cur.execute("SELECT name, value FROM face_store_meta")
                meta = dict(cur.fetchall())
            if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
                raise ModelFileError(
                    f"store_dsn: the database has face_store_* tables that are not a {STORE_FORMAT} version"
                    f" {STORE_VERSION} store; they were left as they are"
                )

    @contextmanager
    def _snapshot(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor of one repeatable-read transaction on the reader connection: its queries all
        see the same state of the tables. Callers hold _sync_lock."""
        import psycopg

        conn = self._reader
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    def _reload(self) -> None:
        """The whole table into the index, and the change it is current to, from one snapshot."""
        with self._sync_lock:
            with self._snapshot() as cur:
                cur.execute("SELECT coalesce(max(seq), 0) FROM face_store_changes")
                seen = (cur.fetchone() or (0,))[0]
                cur.execute("SELECT count(*), max(length(key)) FROM face_store_entries")
                count, length = cur.fetchone() or (0, None)
                rows = np.empty((count, (length or 0) // 4), dtype=np.float32)
                digests: list[bytes] = []
                values: list[bytes] = []
                cur.execute("SELECT digest, key, value FROM face_store_entries")
                for i, (digest, key, value) in enumerate(cur):
                    rows[i] = np.frombuffer(key, dtype="<f4")
                    digests.append(bytes(digest))
                    values.append(bytes(value))
            self.index.replace_all(rows, digests, values)
            self._seen = seen

    def _catch_up(self) -> None:
        """Applies every change after the last one applied, in order; reloads if the log was pruned past it."""
        with self._sync_lock:
            with self._snapshot() as cur:
                cur.execute("SELECT min(seq), max(seq) FROM face_store_changes")
                first, last = cur.fetchone() or (None, None)
                if first is None or last is None or last <= self._seen:
                    return
                if first > self._seen + 1:
                    reload = True
                else:
                    reload = False
                    cur.execute(
                        "SELECT DISTINCT unnest(digests) FROM face_store_changes WHERE seq > %s AND seq <= %s",
                        (self._seen, last),
                    )
                    touched = [bytes(d) for (d,) in cur.fetchall()]
                    cur.execute("SELECT digest, key, value FROM face_store_entries WHERE digest = ANY(%s)", (touched,))
                    present = {bytes(d): (bytes(k), bytes(v)) for d, k, v in cur.fetchall()}
            if not reload:
                reload = not self._apply(touched, present)
            if not reload:
                self._seen = last
        if reload:
            self._reload()

    def _apply(self, touched: list[bytes], present: dict[bytes, tuple[bytes, bytes]]) -> bool:
        """The index made current for these keys; False when the keys changed length (reload instead)."""
        self.index.delete([d for d in touched if d not in present])
        if not present:
            return True
        digests = list(present)
        rows = np.stack([np.frombuffer(present[d][0], dtype="<f4") for d in digests])
        if self.index.dim is not None and rows.shape[1] != self.index.dim:
            return False
        self.index.upsert(rows, digests, [present[d][1] for d in digests])
        return True

    def _listen(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._catch_up()  # whatever changed while not listening
                    idle = 0.0
                    while not self._stop.is_set():
                        heard = list(conn.notifies(timeout=NOTIFY_WAIT_SECONDS, stop_after=1))
                        idle = 0.0 if heard else idle + NOTIFY_WAIT_SECONDS
                        if heard or idle >= POLL_SECONDS:
                            idle = 0.0
                            self._catch_up()
            except psycopg.Error as error:
                if self._stop.is_set():
                    return
                log.warning("postgres store listener: %s; reconnecting", str(error).strip())
                self._stop.wait(1.0)
            except Exception:
                log.exception("postgres store listener failed; restarting it")
                self._stop.wait(1.0)

    # -- writes ------------------------------------------------------------------------------
    def _write(self, rows: np.ndarray, digests: list[bytes], statement: str, parameters: list[tuple]) -> None:
        """One transaction under the write lock: the key-length check against the table, the
        statement, the change log and the notification; then this replica's index is brought up to it."""
        import psycopg

        with self._write_lock:
            try:
                with self._writer.transaction(), self._writer.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    cur.execute("SELECT length(key) FROM face_store_entries LIMIT 1")
                    stored = cur.fetchone()
                    check_dimension(stored[0] // 4 if stored else None, rows, "Keys")
                    cur.executemany(statement, parameters)
                    cur.execute("SELECT coalesce(max(seq), 0) + 1 FROM face_store_changes")
                    seq = (cur.fetchone() or (1,))[0]
                    cur.execute("INSERT INTO face_store_changes (seq, digests) VALUES (%s, %s)", (seq, digests))
                    cur.execute("DELETE FROM face_store_changes WHERE seq <= %s", (seq - RETAIN_CHANGES,))
                    cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
            except InvalidInputError:
                raise
            except psycopg.Error as error:
                raise _unavailable("write failed, nothing was stored", error) from None
        try:
            self._catch_up()
        except psycopg.Error as error:  # committed: the listener applies it once Postgres answers again
            log.warning("postgres store: catching up after a write: %s", error)

    def set(self, rows: np.ndarray, values: Sequence[bytes]) -> None:
        rows, digests, unique_values = last_of_each(rows, values)
        parameters = [(d, r.astype("<f4").tobytes(), v) for d, r, v in zip(digests, rows, unique_values)]
        self._write(rows, digests, UPSERT, parameters)

    def delete(self, rows: np.ndarray) -> None:
        digests = [key_digest(row) for row in rows]
        self._write(rows, digests, "DELETE FROM face_store_entries WHERE digest = %s", [(d,) for d in digests])

    def describe(self) -> str:
        dim = f" of {self.index.dim} floats" if self.index.dim else ""
        return f"postgres store {self._where}: {len(self.index)} keys{dim}, replicas in step by LISTEN/NOTIFY"

    def close(self) -> None:
        self._stop.set()
        self._listener.join(timeout=NOTIFY_WAIT_SECONDS * 4)
        self._close_connections()

    def _close_connections(self) -> None:
        for conn in (getattr(self, "_writer", None), getattr(self, "_reader", None)):
            if conn is not None:
                conn.close()
