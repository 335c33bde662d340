"""`msgledger verify`: recompute the hash chain, then replay the journal into a fresh
projection and compare it with the stored one, row by row.

Runs on a read-only connection inside one read transaction, so it is safe while the daemon
writes; the replay goes to a scratch database on disk, so memory stays flat however large
the journal is.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._messages import Projector, event_from_row
from ._schema import DDL, GENESIS_HASH, connect
from ._writer import INSERT_JOURNAL, ChainBroken, check_row

_JOURNAL = "SELECT seq, at, kind, source, sid, ref, status, data, prev_hash, hash FROM journal"
_PROJECTION = ("SELECT id, sid, ref, to_number, from_number, messaging_service_sid, body,"
               " body_sha256, status, error_code, terminals, flags, created_at, updated_at,"
               " sent_at, last_seq FROM messages ORDER BY id")
_LINKS = "SELECT seq, message_id FROM message_events ORDER BY seq"
REPLAY_FLUSH_EVERY = 1000  # events replayed between writes; any value gives the same result


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    events: int
    messages: int
    first_bad_seq: int | None = None
    reason: str = ""


def verify(path: str) -> VerifyResult:
    if not Path(path).exists():
        return VerifyResult(False, 0, 0, None, f"{path}: no such store")
    stored = connect(path, readonly=True)
    stored.execute("BEGIN")  # one snapshot for the chain and the projection alike
    try:
        with tempfile.TemporaryDirectory(prefix="msgledger-verify-") as scratch:
            replay = _scratch_db(Path(scratch) / "replay.db")
            try:
                return _verify(stored, replay)
            finally:
                replay.close()
    finally:
        stored.close()


def _scratch_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")  # scratch: thrown away at the end
    conn.executescript(DDL)
    return conn


def _verify(stored: sqlite3.Connection, replay: sqlite3.Connection) -> VerifyResult:
    events = 0
    expected_prev = GENESIS_HASH
    replay.execute("BEGIN")
    projector = Projector(replay)
    for row in stored.execute(_JOURNAL + " ORDER BY seq"):
        events += 1
        if row[0] != events:
            return VerifyResult(False, events, 0, events, f"sequence number {events} is missing")
        try:
            check_row(row, expected_prev)
        except ChainBroken as broken:
            return VerifyResult(False, events, 0, broken.seq, broken.why)
        expected_prev = row[9]
        replay.execute(INSERT_JOURNAL, row)
        projector.apply(event_from_row(row[1:8]), row[0])
        if events % REPLAY_FLUSH_EVERY == 0:
            projector.flush()
    projector.flush()
    replay.execute("COMMIT")
    return _compare(stored, replay, events)


def _compare(stored: sqlite3.Connection, replay: sqlite3.Connection, events: int) -> VerifyResult:
    messages = 0
    for mine, theirs in _pairs(stored.execute(_PROJECTION), replay.execute(_PROJECTION)):
        messages += 1
        if mine != theirs:
            seq = (mine or theirs or (0,) * 16)[15]
            key = (mine or theirs or (None,) * 3)[1:3]
            return VerifyResult(False, events, messages, int(str(seq)),
                                f"projection differs from the replay for message {key}")
    for mine, theirs in _pairs(stored.execute(_LINKS), replay.execute(_LINKS)):
        if mine != theirs:
            seq = (mine or theirs or (0,))[0]
            return VerifyResult(False, events, messages, int(str(seq)),
                                "event-to-message links differ from the replay")
    return VerifyResult(True, events, messages)


def _pairs(a: Iterator[tuple[object, ...]],
           b: Iterator[tuple[object, ...]]) -> Iterator[tuple[tuple[object, ...] | None,
                                                           tuple[object, ...] | None]]:
    while True:
        x, y = next(a, None), next(b, None)
        if x is None and y is None:
            return
        yield x, y
