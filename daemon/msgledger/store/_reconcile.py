"""The reconciler's reads: what the store knows of the SIDs a listing names, the sends of
unknown outcome a listed message may be, a day's messages, and the runs in the journal.

Each takes the connection it is given and returns plain values; the reconciler calls them
through `StoreReads`, one batch (up to `BATCH` SIDs) a call, so that a day of millions is
never in memory.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ._schema import DAY_OF, RUN_KINDS_SQL

BATCH = 1000  # SIDs a lookup: under SQLite's 32,766 variables, and few statements a day


@dataclass(frozen=True, slots=True)
class Known:
    """What the store holds of a message the listing named."""

    id: int
    status: str | None
    terminals: frozenset[str]
    flags: frozenset[str]


@dataclass(frozen=True, slots=True)
class UnknownSend:
    """A send whose outcome is unknown (no SID): what a listed message is matched on."""

    id: int
    ref: str
    to: str | None
    from_: str | None
    messaging_service_sid: str | None
    body_sha256: str | None
    created_at: str  # when msgledger journaled the request (UTC ISO 8601)
    flags: frozenset[str]


@dataclass(frozen=True, slots=True)
class DayMessage:
    """A message of the day, as the check for those the listing left out needs it."""

    id: int
    sid: str | None
    status: str | None
    flags: frozenset[str]


def known_sids(conn: sqlite3.Connection, sids: Sequence[str]) -> dict[str, Known]:
    """The store's messages among `sids` (at most BATCH), by SID."""
    if not sids:
        return {}
    rows = conn.execute(
        "SELECT sid, id, status, terminals, flags FROM messages"
        f" WHERE sid IN ({', '.join('?' * len(sids))})", list(sids))
    return {sid: Known(message_id, status, _set(terminals), _set(flags))
            for sid, message_id, status, terminals, flags in rows}


def unknown_sends(conn: sqlite3.Connection, start: str, end: str) -> list[UnknownSend]:
    """The sends of unknown outcome first seen in [start, end): the candidates of one day's
    matching. As many as sends were lost, not the day's count."""
    rows = conn.execute(
        "SELECT id, ref, to_number, from_number, messaging_service_sid, body_sha256,"
        " created_at, flags FROM messages WHERE status IN ('outcome_unknown', 'requested')"
        " AND sid IS NULL AND ref IS NOT NULL AND created_at >= ? AND created_at < ?",
        (start, end))
    return [UnknownSend(message_id, ref, to, from_, service, sha, created, _set(flags))
            for message_id, ref, to, from_, service, sha, created, flags in rows]


def day_count(conn: sqlite3.Connection, start: str, end: str) -> int:
    """How many messages the store holds for [start, end) (`DAY_OF`)."""
    row = conn.execute(f"SELECT count(*) FROM messages WHERE {DAY_OF} >= ? AND {DAY_OF} < ?",
                       (start, end)).fetchone()
    return int(row[0])


def day_messages(conn: sqlite3.Connection, start: str, end: str, after_id: int,
                 limit: int = BATCH) -> list[DayMessage]:
    """The next `limit` messages of [start, end) with an id above `after_id`, by id."""
    rows = conn.execute(
        f"SELECT id, sid, status, flags FROM messages WHERE {DAY_OF} >= ? AND {DAY_OF} < ?"
        " AND id > ? ORDER BY id LIMIT ?", (start, end, after_id, limit))
    return [DayMessage(message_id, sid, status, _set(flags))
            for message_id, sid, status, flags in rows]


def day_id_range(conn: sqlite3.Connection, start: str, end: str) -> tuple[int, int] | None:
    """The lowest and highest id among the messages of [start, end), if it has any."""
    row = conn.execute(f"SELECT min(id), max(id) FROM messages WHERE {DAY_OF} >= ?"
                       f" AND {DAY_OF} < ?", (start, end)).fetchone()
    return None if row[0] is None else (int(row[0]), int(row[1]))


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One of a run's journal events (`RUN_KINDS`)."""

    seq: int
    at: str
    kind: str
    data: dict[str, Any]


def run_events(conn: sqlite3.Connection, *, before_seq: int | None = None,
               limit: int = 200) -> list[RunEvent]:
    """The newest run events (below `before_seq`), newest first."""
    rows = conn.execute(
        f"SELECT seq, at, kind, data FROM journal WHERE {RUN_KINDS_SQL} AND seq < ?"
        " ORDER BY seq DESC LIMIT ?", (before_seq or 2**62, limit))
    return [RunEvent(seq, at, kind, json.loads(data)) for seq, at, kind, data in rows]


def iter_run_events(conn: sqlite3.Connection) -> Iterator[RunEvent]:
    """Every run event, newest first, a page at a time."""
    before: int | None = None
    while page := run_events(conn, before_seq=before):
        yield from page
        before = page[-1].seq


_EMPTY: frozenset[str] = frozenset()


def _set(text: object) -> frozenset[str]:
    """A stored JSON list of strings (`flags`, `terminals`); most are empty, read at once."""
    if not text or text == "[]":
        return _EMPTY
    return frozenset(orjson.loads(str(text)))
