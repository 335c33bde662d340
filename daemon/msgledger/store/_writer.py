"""The journal writer: appends batches of events in one transaction each.

Owned by the journal actor and used from one worker thread at a time. The chain's tail
(last sequence number and hash) advances only after a COMMIT succeeds, so a failed batch
(disk full, read-only file) leaves nothing half-written and the next batch carries on.

After each COMMIT, before anything is acknowledged, it checks that the store's names still
lead to the files it writes (`_file.HeldFiles.moved`: one stat per file per batch). A store
removed or replaced under it is lost for good: what it commits from then on could never be
read back, so it refuses every batch (StoreLost) until a restart opens the file that is
there now.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from ..events import Event
from ._bulk import insert_rows
from ._chain import canonical_json, row_hash
from ._file import HeldFiles, StoreError, StoreLost
from ._projector import Projector
from ._schema import GENESIS_HASH, JOURNAL_COLUMNS, JournalRow, connect, prepare, wal_path

TAIL_CHECK_ROWS = 1000  # rows re-hashed at start: catches a torn or edited tail cheaply
JOURNAL_INTO = f"INSERT INTO journal ({JOURNAL_COLUMNS})"
INSERT_JOURNAL = f"{JOURNAL_INTO} VALUES ({', '.join('?' * len(JournalRow._fields))})"
# A file fetched twice (a restart mid-fetch) keeps the first copy, as the record does.
INSERT_MEDIA = ("INSERT OR IGNORE INTO media_files (sid, n, content_type, sha256, bytes, seq)"
                " VALUES (?, ?, ?, ?, ?, ?)")


class ChainBroken(Exception):
    """The journal's hash chain does not check out; `seq` is the first bad row."""

    def __init__(self, seq: int, why: str) -> None:
        super().__init__(f"journal chain broken at seq {seq}: {why}")
        self.seq = seq
        self.why = why


@dataclass(frozen=True)
class Tail:
    seq: int
    hash: str


class JournalWriter:
    """The single writer of the store."""

    def __init__(self, conn: sqlite3.Connection, tail: Tail, files: HeldFiles) -> None:
        self._conn = conn
        self._tail = tail
        self._projector = Projector(conn)
        self._files = files
        self._lost: str | None = None  # why the store's names lead elsewhere now
        self.refused_batches = 0  # batches refused since (StoreLost raised)
        self.upgraded_from: int | None = None  # the schema version `open` upgraded, if any

    @classmethod
    def open(cls, path: str) -> JournalWriter:
        """Open (or create) the store as its only writer and check the tail of its chain.

        StoreError if `path` cannot be the store: missing directory, not a file, in use by
        another daemon, not a msgledger store (or a newer one), not readable by SQLite.
        ChainBroken if its tail does not check out.
        """
        files = HeldFiles.open(path)
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(path)
            upgraded_from = prepare(conn, path)
            tail = check_tail(conn, TAIL_CHECK_ROWS)
            wal = wal_path(path)  # it holds committed rows until a checkpoint: watch it too
            files.watch(wal, f"its WAL {wal}")
            writer = cls(conn, tail, files)
            writer.upgraded_from = upgraded_from
            return writer
        except BaseException as error:
            if conn is not None:
                conn.close()  # before the fds: see `_file`
            files.close()
            if isinstance(error, sqlite3.Error):
                raise StoreError(path, f"SQLite cannot use it: {error}") from error
            raise

    @property
    def last_seq(self) -> int:
        return self._tail.seq

    @property
    def tail(self) -> Tail:
        """The last committed row's seq and hash (replaced whole on commit, so safe to read
        from the Trio thread while a commit runs)."""
        return self._tail

    def append(self, events: Sequence[Event]) -> list[int]:
        """Journal and project `events` in one transaction; their sequence numbers.

        StoreLost, committed or not, once the store's files are no longer at their names:
        then none of the batch may be acknowledged.
        """
        if self._lost is not None:
            self.refused_batches += 1
            raise StoreLost(self._files.path, self._lost, first=False)
        rows = self._chain(events)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            insert_rows(self._conn, JOURNAL_INTO, rows)
            self._projector.prefetch(events)
            for event, row in zip(events, rows, strict=True):
                self._projector.apply(event, row.seq)
            self._projector.flush()
            self._store_media(events, rows)
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            self._projector.reset()  # its batch's states were never committed
            raise
        self._tail = Tail(rows[-1].seq, rows[-1].hash) if rows else self._tail
        self._check_names()
        return [row.seq for row in rows]

    def _store_media(self, events: Sequence[Event], rows: Sequence[JournalRow]) -> None:
        """The bytes that ride with `media_archived` events, beside their rows."""
        files = [(e.sid, e.data["n"], e.data.get("content_type"), e.data["sha256"], e.blob,
                  row.seq) for e, row in zip(events, rows, strict=True)
                 if e.blob is not None and e.kind == "media_archived"]
        if files:
            self._conn.executemany(INSERT_MEDIA, files)

    def _check_names(self) -> None:
        """StoreLost unless the store's names still lead to the files this writer holds."""
        moved = self._files.moved()
        if moved is None:
            return
        self._lost = f"{moved}; nothing is acknowledged until msgledger restarts"
        self.refused_batches += 1
        # Let go now: SQLite hands the WAL back to the file it belongs to and removes the
        # WAL's name (if still ours), so a restart does not replay it into the file that
        # took the store's place.
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        raise StoreLost(self._files.path, self._lost, first=True)

    def _chain(self, events: Sequence[Event]) -> list[JournalRow]:
        """The journal rows for `events`, each hashed onto the one before."""
        seq, prev = self._tail.seq, self._tail.hash
        rows: list[JournalRow] = []
        for event in events:
            seq += 1
            data = canonical_json(event.data)
            digest = row_hash(prev, seq, event.at, event.kind, event.source, event.sid,
                              event.ref, event.status, data)
            rows.append(JournalRow(seq, event.at, event.kind, event.source, event.sid,
                                   event.ref, event.status, data, prev, digest))
            prev = digest
        return rows

    def _rollback(self) -> None:
        # SQLite may have rolled back already (SQLITE_FULL ends the transaction itself).
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()
        self._files.close()  # after the connection: see `_file`


def check_tail(conn: sqlite3.Connection, rows: int) -> Tail:
    """Re-hash the last `rows` journal rows; the tail to append after, or ChainBroken."""
    found = [JournalRow._make(row) for row in conn.execute(
        f"SELECT {JOURNAL_COLUMNS} FROM journal"
        " WHERE seq > (SELECT coalesce(max(seq), 0) FROM journal) - ? ORDER BY seq",
        (rows,))]
    if not found:
        return Tail(0, GENESIS_HASH)
    expected_prev: str | None = None
    for row in found:
        check_row(row, expected_prev)
        expected_prev = row.hash
    return Tail(found[-1].seq, found[-1].hash)


def check_row(row: JournalRow, expected_prev: str | None) -> None:
    """Raise ChainBroken unless `row` links to `expected_prev` and hashes to its own hash.
    The row is as SQLite returned it: a value of the wrong type fails the hash, as an edit
    would."""
    if expected_prev is not None and row.prev_hash != expected_prev:
        raise ChainBroken(int(row.seq), "prev_hash does not match the previous row's hash")
    again = row_hash(str(row.prev_hash), int(row.seq), str(row.at), str(row.kind),
                     str(row.source), row.sid, row.ref, row.status, str(row.data))
    if again != row.hash:
        raise ChainBroken(int(row.seq), "row content does not match its hash")
