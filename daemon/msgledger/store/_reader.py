"""Read-only queries: the record of a message, history included (docs/design.md, "The
exported record").

Readers open their own connections; in WAL mode they never block the journal writer, and
everything read inside one transaction comes from one consistent snapshot.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from typing import Any, NamedTuple

from ._fold import SETTLED

Record = dict[str, Any]


class _MessageRow(NamedTuple):
    """What a record reads of `messages`, by name (the columns are `_schema`'s)."""

    id: int
    sid: str | None
    ref: str | None
    to_number: str | None
    from_number: str | None
    messaging_service_sid: str | None
    body: str | None
    body_sha256: str | None
    status: str | None
    error_code: str | None
    flags: str
    created_at: str
    updated_at: str
    sent_at: str | None
    polls: int
    next_poll_at: str | None
    poll_from: str | None
    direction: str | None
    in_reply_to: str | None
    received_at: str | None
    media: str | None


class _HistoryRow(NamedTuple):
    """What a history entry reads of `journal`."""

    seq: int
    at: str
    kind: str
    source: str
    status: str | None
    data: str


_MESSAGE_COLUMNS = ", ".join(f"m.{column}" for column in _MessageRow._fields)
_HISTORY_COLUMNS = ", ".join(f"j.{column}" for column in _HistoryRow._fields)
_MESSAGE_WIDTH = len(_MessageRow._fields)  # a joined row: the message, then its event


def _record(row: _MessageRow) -> Record:
    return {
        "sid": row.sid, "ref": row.ref, "to": row.to_number, "from": row.from_number,
        "messaging_service_sid": row.messaging_service_sid, "status": row.status,
        "error_code": row.error_code, "final": row.status in SETTLED, "body": row.body,
        "body_sha256": row.body_sha256, "flags": json.loads(row.flags),
        "created_at": row.created_at, "updated_at": row.updated_at, "sent_at": row.sent_at,
        # The next poll, while there is one: the poller is done with a final or
        # `unconfirmed` message, whatever time its last answer set.
        "polls": row.polls, "next_poll_at": row.next_poll_at if row.poll_from else None,
        "direction": row.direction, "in_reply_to": row.in_reply_to,
        "received_at": row.received_at, "media": _media(row.media),
        "history": [],
    }


# What the record shows of each media file: the fetcher's bookkeeping (retry time) stays in
# the history.
_MEDIA_SHOWN = ("n", "url", "content_type", "state", "size", "sha256", "kept", "attempts",
                "error")


def _media(raw: str | None) -> list[dict[str, Any]]:
    return [{key: item.get(key) for key in _MEDIA_SHOWN} for item in json.loads(raw)
            ] if raw else []



def _history_entry(row: _HistoryRow) -> dict[str, Any]:
    entry: dict[str, Any] = {"seq": row.seq, "at": row.at, "source": row.source,
                             "kind": row.kind}
    if row.status is not None:
        entry["status"] = row.status
    entry["data"] = json.loads(row.data)
    return entry


def find_record(conn: sqlite3.Connection, key: str) -> Record | None:
    """The record whose SID or ref is `key`, history included; None if there is none."""
    conn.execute("BEGIN")
    try:
        row = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.sid = ?"
                           " UNION ALL "
                           f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.ref = ?"
                           " LIMIT 1", (key, key)).fetchone()
        return None if row is None else _with_history(conn, _MessageRow._make(row))
    finally:
        conn.execute("COMMIT")


def iter_records(conn: sqlite3.Connection, since: str | None = None,
                 until: str | None = None) -> Iterator[Record]:
    """Every record created in [since, until), in the order msgledger first saw them.

    The caller holds the transaction open (`BEGIN` ... `COMMIT`) for the whole iteration.
    """
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS}, {_HISTORY_COLUMNS} FROM messages m"
        " JOIN message_events e ON e.message_id = m.id JOIN journal j ON j.seq = e.seq"
        " WHERE m.created_at >= ? AND m.created_at < ? ORDER BY m.id, e.seq",
        (since or "", until or "\uffff"))
    current: Record | None = None
    current_id: int | None = None
    for row in rows:
        message = _MessageRow._make(row[:_MESSAGE_WIDTH])
        if message.id != current_id:
            if current is not None:
                yield current
            current, current_id = _record(message), message.id
        assert current is not None
        current["history"].append(_history_entry(_HistoryRow._make(row[_MESSAGE_WIDTH:])))
    if current is not None:
        yield current


def list_records(conn: sqlite3.Connection, *, status: str | None = None,
                 overdue_before: str | None = None, since: str | None = None,
                 until: str | None = None, after: int = 0,
                 limit: int = 100) -> tuple[list[Record], int | None]:
    """One page of records by message id, and the cursor of the next page (None: last).

    `overdue_before` selects the overdue (`_schedule.poll_backlog`): the poller's, polled
    already or with an age counting from before that instant.
    """
    where: list[str] = ["m.id > ?"]
    params: list[object] = [after]
    if status is not None:
        where.append("m.status = ?")
        params.append(status)
    if overdue_before is not None:
        where.append("m.poll_from IS NOT NULL AND (m.polls > 0 OR m.poll_from <= ?)")
        params.append(overdue_before)
    for column, op, value in (("created_at", ">=", since), ("created_at", "<", until)):
        if value is not None:
            where.append(f"m.{column} {op} ?")
            params.append(value)
    conn.execute("BEGIN")
    try:
        rows = [_MessageRow._make(row) for row in conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE {' AND '.join(where)}"
            " ORDER BY m.id LIMIT ?", (*params, limit + 1))]
        records = [_with_history(conn, row) for row in rows[:limit]]
    finally:
        conn.execute("COMMIT")
    return records, (rows[limit - 1].id if len(rows) > limit else None)


def _with_history(conn: sqlite3.Connection, row: _MessageRow) -> Record:
    record = _record(row)
    record["history"] = [_history_entry(_HistoryRow._make(h)) for h in conn.execute(
        f"SELECT {_HISTORY_COLUMNS} FROM message_events e JOIN journal j ON j.seq = e.seq"
        " WHERE e.message_id = ? ORDER BY e.seq", (row.id,))]
    return record


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(status): int(n) for status, n in conn.execute(
        "SELECT coalesce(status, 'none'), count(*) FROM messages GROUP BY 1 ORDER BY 1")}


def overdue_cutoff(overdue_after: float, now: dt.datetime | None = None) -> str:
    """The instant before which the poller's message (its age counting from then) is
    overdue."""
    now = now or dt.datetime.now(dt.UTC)
    return (now - dt.timedelta(seconds=overdue_after)).isoformat(timespec="microseconds")


def journal_size(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0])
