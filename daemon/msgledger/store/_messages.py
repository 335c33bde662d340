"""The projection tables: which message an event belongs to, and its folded state.

`project()` is the only code that writes `messages` and `message_events`. The journal
writer calls it inside the commit that appends the event; `verify` calls it to replay the
journal into a fresh database. Both must therefore see exactly the same rules.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import replace

from ..events import Event
from ._projection import MessageState, apply

_COLUMNS = ("sid", "ref", "to_number", "from_number", "messaging_service_sid", "body",
            "body_sha256", "status", "error_code", "terminals", "flags", "created_at",
            "updated_at", "sent_at", "last_seq")


def event_from_row(row: sqlite3.Row | tuple[object, ...]) -> Event:
    """A journal row (at, kind, source, sid, ref, status, data) back into its Event."""
    at, kind, source, sid, ref, status, data = row
    return Event(kind=kind, source=source, at=at, sid=sid, ref=ref,  # type: ignore[arg-type]
                 status=status, data=json.loads(str(data)))  # type: ignore[arg-type]


def project(conn: sqlite3.Connection, event: Event, seq: int) -> int | None:
    """Fold `event` (journal sequence `seq`) into its message; returns the message id.

    Events that name no message (a Debugger alert about something else) stay journal-only.
    """
    if event.sid is None and event.ref is None:
        return None
    message_id, event, extra = _resolve(conn, event)
    state = _load(conn, message_id) if message_id is not None else None
    new = apply(state, event)
    if extra:
        new = replace(new, flags=new.flags | extra)
    message_id = _save(conn, message_id, new, seq)
    conn.execute("INSERT INTO message_events (seq, message_id) VALUES (?, ?)", (seq, message_id))
    return message_id


def _resolve(conn: sqlite3.Connection, event: Event) -> tuple[int | None, Event, frozenset[str]]:
    by_ref = _find(conn, "ref", event.ref)
    by_sid = _find(conn, "sid", event.sid)
    if by_ref is not None and event.sid is not None:
        known_sid = conn.execute("SELECT sid FROM messages WHERE id = ?", (by_ref,)).fetchone()[0]
        if known_sid is not None and known_sid != event.sid:
            # The ref already names another SID: keep this one apart, and say so.
            return by_sid, replace(event, ref=None), frozenset({"ref_conflict"})
    if by_ref is not None and by_sid is not None and by_ref != by_sid:
        # A callback without our ref created a row before the send's SID was journaled.
        return _merge(conn, keep=by_ref, gone=by_sid), event, frozenset()
    return (by_ref if by_ref is not None else by_sid), event, frozenset()


def _find(conn: sqlite3.Connection, column: str, value: str | None) -> int | None:
    if value is None:
        return None
    row = conn.execute(f"SELECT id FROM messages WHERE {column} = ?", (value,)).fetchone()
    return None if row is None else int(row[0])


def _merge(conn: sqlite3.Connection, *, keep: int, gone: int) -> int:
    """Move `gone`'s events to `keep` and refold `keep` from all of them, in journal order."""
    conn.execute("UPDATE message_events SET message_id = ? WHERE message_id = ?", (keep, gone))
    conn.execute("DELETE FROM messages WHERE id = ?", (gone,))
    rows = conn.execute(
        "SELECT j.seq, j.at, j.kind, j.source, j.sid, j.ref, j.status, j.data"
        " FROM message_events e JOIN journal j ON j.seq = e.seq"
        " WHERE e.message_id = ? ORDER BY j.seq", (keep,)).fetchall()
    state = fold(event_from_row(r[1:]) for r in rows)
    if state is not None:
        _save(conn, keep, state, int(rows[-1][0]))
    return keep


def fold(events: Iterable[Event]) -> MessageState | None:
    state: MessageState | None = None
    for event in events:
        state = apply(state, event)
    return state


def _load(conn: sqlite3.Connection, message_id: int) -> MessageState:
    row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM messages WHERE id = ?",
                       (message_id,)).fetchone()
    (sid, ref, to, from_, mss, body, body_sha256, status, error_code, terminals, flags,
     created_at, updated_at, sent_at, _) = row
    return MessageState(
        sid=sid, ref=ref, to=to, from_=from_, messaging_service_sid=mss, body=body,
        body_sha256=body_sha256, status=status, error_code=error_code,
        terminals=frozenset(json.loads(terminals)), flags=frozenset(json.loads(flags)),
        created_at=created_at, updated_at=updated_at, sent_at=sent_at,
    )


def _save(conn: sqlite3.Connection, message_id: int | None, s: MessageState, seq: int) -> int:
    values = (s.sid, s.ref, s.to, s.from_, s.messaging_service_sid, s.body, s.body_sha256,
              s.status, s.error_code, json.dumps(sorted(s.terminals)),
              json.dumps(sorted(s.flags)), s.created_at, s.updated_at, s.sent_at, seq)
    if message_id is None:
        cursor = conn.execute(
            f"INSERT INTO messages ({', '.join(_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(_COLUMNS))})", values)
        return int(cursor.lastrowid or 0)
    assignments = ", ".join(f"{c} = ?" for c in _COLUMNS)
    conn.execute(f"UPDATE messages SET {assignments} WHERE id = ?", (*values, message_id))
    return message_id
