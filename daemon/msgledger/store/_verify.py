"""`msgledger verify`: check the file (a msgledger store of this schema version, and
SQLite's `integrity_check`), recompute the hash chain, then replay the journal into a fresh
projection and compare it with the stored one, row by row.

`integrity_check` rather than `quick_check`: quick_check does not compare each index with
its table, and the writer finds messages through their indexes (sid, ref), so a damaged
index would go unseen by the replay yet misfile events. The full check is cheap beside the
replay (bench/README.md, "Measured once").

Runs on a read-only connection inside one read transaction, so it is safe while the daemon
writes; the replay goes to a scratch database on disk, so memory stays flat however large
the journal is.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._file import StoreError
from ._projector import Projector, event_from_row
from ._schema import (
    DDL,
    GENESIS_HASH,
    JOURNAL_COLUMNS,
    MESSAGE_COLUMNS,
    JournalRow,
    check_store,
    connect,
)
from ._writer import INSERT_JOURNAL, ChainBroken, check_row

_JOURNAL = f"SELECT {JOURNAL_COLUMNS} FROM journal"
_PROJECTION_FIELDS = ("id", *MESSAGE_COLUMNS)
_PROJECTION = f"SELECT {', '.join(_PROJECTION_FIELDS)} FROM messages ORDER BY id"
_LINKS = "SELECT seq, message_id FROM message_events ORDER BY seq"
REPLAY_FLUSH_EVERY = 1000  # events replayed between writes; any value gives the same result
INTEGRITY_MESSAGES = 3  # problems integrity_check reports at most: the first says enough


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
    try:
        return _verify_file(path)
    except sqlite3.DatabaseError as error:  # a page too damaged to read at all
        return VerifyResult(False, 0, 0, None, f"{path}: SQLite cannot read it: {error}")


def _verify_file(path: str) -> VerifyResult:
    stored = connect(path, readonly=True)
    try:
        stored.execute("BEGIN")  # one snapshot for the file, the chain and the projection
        problem = _file_problem(stored, path)
        if problem is not None:
            return VerifyResult(False, 0, 0, None, problem)
        with tempfile.TemporaryDirectory(prefix="msgledger-verify-") as scratch:
            replay = _scratch_db(Path(scratch) / "replay.db")
            try:
                return _verify(stored, replay)
            finally:
                replay.close()
    finally:
        stored.close()


def _file_problem(stored: sqlite3.Connection, path: str) -> str | None:
    """Why the file is not a sound msgledger store this version reads, or None."""
    try:
        if not check_store(stored, path):
            return f"{path}: an empty database, not a msgledger store"
    except StoreError as error:
        return str(error)
    try:
        found = [str(row[0]) for row in
                 stored.execute(f"PRAGMA integrity_check({INTEGRITY_MESSAGES})")]
    except sqlite3.DatabaseError as error:  # a page so garbled the check cannot go on
        found = [str(error)]
    if found != ["ok"]:
        return f"{path}: the file is damaged (integrity_check: {'; '.join(found)})"
    return None


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
    for raw in stored.execute(_JOURNAL + " ORDER BY seq"):
        row = JournalRow._make(raw)
        events += 1
        if row.seq != events:
            return VerifyResult(False, events, 0, events, f"sequence number {events} is missing")
        try:
            check_row(row, expected_prev)
        except ChainBroken as broken:
            return VerifyResult(False, events, 0, broken.seq, broken.why)
        expected_prev = row.hash
        replay.execute(INSERT_JOURNAL, row)
        projector.apply(event_from_row(row), row.seq)
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
            row = dict(zip(_PROJECTION_FIELDS, mine or theirs or (), strict=True))
            return VerifyResult(False, events, messages, int(str(row["last_seq"])),
                                "projection differs from the replay for message"
                                f" {(row['sid'], row['ref'])}")
    for mine, theirs in _pairs(stored.execute(_LINKS), replay.execute(_LINKS)):
        if mine != theirs:
            seq, _message_id = mine or theirs or (0, 0)
            return VerifyResult(False, events, messages, int(str(seq)),
                                "event-to-message links differ from the replay")
    bad_file = _media_problem(stored)
    if bad_file is not None:
        return VerifyResult(False, events, messages, bad_file[0], bad_file[1])
    return VerifyResult(True, events, messages)


# Each kept media file beside the `media_archived` row that journaled its hash.
_MEDIA_FILES = ("SELECT f.seq, f.sid, f.n, f.sha256, f.bytes, j.kind, j.sid, j.data"
                " FROM media_files f LEFT JOIN journal j ON j.seq = f.seq ORDER BY f.seq")


def _media_problem(stored: sqlite3.Connection) -> tuple[int, str] | None:
    """The first kept media file whose bytes are not the ones its journal row hashed."""
    for seq, sid, n, sha256, blob, kind, journaled_sid, data in stored.execute(_MEDIA_FILES):
        archived = json.loads(data) if kind == "media_archived" else {}
        if (journaled_sid, archived.get("n"), archived.get("sha256")) != (sid, n, sha256):
            return int(seq), f"media file {n} of {sid} has no journal row that archived it"
        if hashlib.sha256(bytes(blob)).hexdigest() != sha256:
            return int(seq), f"media file {n} of {sid} does not match its journaled SHA-256"
    return None


def _pairs(a: Iterator[tuple[object, ...]],
           b: Iterator[tuple[object, ...]]) -> Iterator[tuple[tuple[object, ...] | None,
                                                           tuple[object, ...] | None]]:
    while True:
        x, y = next(a, None), next(b, None)
        if x is None and y is None:
            return
        yield x, y
