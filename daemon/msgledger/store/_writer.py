"""The journal writer: appends batches of events in one transaction each.

Owned by the journal actor and used from one worker thread at a time. The chain's tail
(last sequence number and hash) advances only after a COMMIT succeeds, so a failed batch
(disk full, read-only file) leaves nothing half-written and the next batch carries on.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from ..events import Event
from ._bulk import insert_rows
from ._chain import canonical_json, row_hash
from ._messages import Projector
from ._schema import GENESIS_HASH, connect, create

TAIL_CHECK_ROWS = 1000  # rows re-hashed at start: catches a torn or edited tail cheaply
JOURNAL_INTO = ("INSERT INTO journal"
                " (seq, at, kind, source, sid, ref, status, data, prev_hash, hash)")
INSERT_JOURNAL = f"{JOURNAL_INTO} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# seq, at, kind, source, sid, ref, status, data, prev_hash, hash
JournalRow = tuple[int, str, str, str, str | None, str | None, str | None, str, str, str]


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

    def __init__(self, conn: sqlite3.Connection, tail: Tail) -> None:
        self._conn = conn
        self._tail = tail
        self._projector = Projector(conn)

    @classmethod
    def open(cls, path: str) -> JournalWriter:
        """Open (or create) the store and check the tail of its chain."""
        conn = connect(path)
        create(conn)
        return cls(conn, check_tail(conn, TAIL_CHECK_ROWS))

    @property
    def last_seq(self) -> int:
        return self._tail.seq

    @property
    def tail(self) -> Tail:
        """The last committed row's seq and hash (replaced whole on commit, so safe to read
        from the Trio thread while a commit runs)."""
        return self._tail

    def append(self, events: Sequence[Event]) -> list[int]:
        """Journal and project `events` in one transaction; their sequence numbers."""
        rows = self._chain(events)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            insert_rows(self._conn, JOURNAL_INTO, rows)
            self._projector.prefetch(events)
            for event, row in zip(events, rows, strict=True):
                self._projector.apply(event, row[0])
            self._projector.flush()
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            self._projector.reset()  # its batch's states were never committed
            raise
        self._tail = Tail(rows[-1][0], rows[-1][-1]) if rows else self._tail
        return [row[0] for row in rows]

    def _chain(self, events: Sequence[Event]) -> list[JournalRow]:
        """The journal rows for `events`, each hashed onto the one before."""
        seq, prev = self._tail.seq, self._tail.hash
        rows: list[JournalRow] = []
        for event in events:
            seq += 1
            data = canonical_json(event.data)
            digest = row_hash(prev, seq, event.at, event.kind, event.source, event.sid,
                              event.ref, event.status, data)
            rows.append((seq, event.at, event.kind, event.source, event.sid, event.ref,
                         event.status, data, prev, digest))
            prev = digest
        return rows

    def _rollback(self) -> None:
        # SQLite may have rolled back already (SQLITE_FULL ends the transaction itself).
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


def check_tail(conn: sqlite3.Connection, rows: int) -> Tail:
    """Re-hash the last `rows` journal rows; the tail to append after, or ChainBroken."""
    found = conn.execute(
        "SELECT seq, at, kind, source, sid, ref, status, data, prev_hash, hash FROM journal"
        " WHERE seq > (SELECT coalesce(max(seq), 0) FROM journal) - ? ORDER BY seq",
        (rows,)).fetchall()
    if not found:
        return Tail(0, GENESIS_HASH)
    expected_prev: str | None = None
    for row in found:
        check_row(row, expected_prev)
        expected_prev = row[9]
    return Tail(int(found[-1][0]), str(found[-1][9]))


def check_row(row: Sequence[object], expected_prev: str | None) -> None:
    """Raise ChainBroken unless `row` links to `expected_prev` and hashes to its own hash."""
    seq, at, kind, source, sid, ref, status, data, prev_hash, digest = row
    if expected_prev is not None and prev_hash != expected_prev:
        raise ChainBroken(int(str(seq)), "prev_hash does not match the previous row's hash")
    again = row_hash(str(prev_hash), int(str(seq)), str(at), str(kind), str(source),
                     sid, ref, status, str(data))  # type: ignore[arg-type]
    if again != digest:
        raise ChainBroken(int(str(seq)), "row content does not match its hash")
