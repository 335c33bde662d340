"""Read-only queries: the record of a message, history included, as DESIGN.md defines it.

Readers open their own connections; in WAL mode they never block the journal writer, and
everything read inside one transaction comes from one consistent snapshot.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

from ._fold import FINAL, SETTLED

Record = dict[str, Any]

_MESSAGE_COLUMNS = ("m.id, m.sid, m.ref, m.to_number, m.from_number, m.messaging_service_sid,"
                    " m.body, m.body_sha256, m.status, m.error_code, m.flags, m.created_at,"
                    " m.updated_at, m.sent_at")
_HISTORY_COLUMNS = "j.seq, j.at, j.kind, j.source, j.status, j.data"


def _record(row: tuple[Any, ...]) -> Record:
    (_, sid, ref, to, from_, mss, body, body_sha256, status, error_code, flags, created_at,
     updated_at, sent_at) = row
    return {
        "sid": sid, "ref": ref, "to": to, "from": from_, "messaging_service_sid": mss,
        "status": status, "error_code": error_code, "final": status in SETTLED,
        "body": body, "body_sha256": body_sha256, "flags": json.loads(flags),
        "created_at": created_at, "updated_at": updated_at, "sent_at": sent_at,
        "history": [],
    }


def _history_entry(row: tuple[Any, ...]) -> dict[str, Any]:
    seq, at, kind, source, status, data = row
    entry: dict[str, Any] = {"seq": seq, "at": at, "source": source, "kind": kind}
    if status is not None:
        entry["status"] = status
    entry["data"] = json.loads(data)
    return entry


def find_record(conn: sqlite3.Connection, key: str) -> Record | None:
    """The record whose SID or ref is `key`, history included; None if there is none."""
    conn.execute("BEGIN")
    try:
        row = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.sid = ?"
                           " UNION ALL "
                           f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.ref = ?"
                           " LIMIT 1", (key, key)).fetchone()
        return None if row is None else _with_history(conn, row)
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
        if row[0] != current_id:
            if current is not None:
                yield current
            current, current_id = _record(row[:14]), row[0]
        assert current is not None
        current["history"].append(_history_entry(row[14:]))
    if current is not None:
        yield current


def list_records(conn: sqlite3.Connection, *, status: str | None = None,
                 sent_before: str | None = None, since: str | None = None,
                 until: str | None = None, after: int = 0,
                 limit: int = 100) -> tuple[list[Record], int | None]:
    """One page of records by message id, and the cursor of the next page (None: last).

    `sent_before` selects the overdue: a SID, not final, and sent before that instant.
    """
    where: list[str] = ["m.id > ?"]
    params: list[object] = [after]
    if status is not None:
        where.append("m.status = ?")
        params.append(status)
    if sent_before is not None:
        where.append(f"m.sid IS NOT NULL AND m.sent_at < ? AND m.status NOT IN "
                     f"({', '.join('?' * len(FINAL))})")
        params.extend([sent_before, *sorted(FINAL)])
    for column, op, value in (("created_at", ">=", since), ("created_at", "<", until)):
        if value is not None:
            where.append(f"m.{column} {op} ?")
            params.append(value)
    conn.execute("BEGIN")
    try:
        rows = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
                            f" WHERE {' AND '.join(where)} ORDER BY m.id LIMIT ?",
                            (*params, limit + 1)).fetchall()
        records = [_with_history(conn, row) for row in rows[:limit]]
    finally:
        conn.execute("COMMIT")
    return records, (int(rows[limit - 1][0]) if len(rows) > limit else None)


def _with_history(conn: sqlite3.Connection, row: tuple[Any, ...]) -> Record:
    record = _record(row)
    record["history"] = [_history_entry(h) for h in conn.execute(
        f"SELECT {_HISTORY_COLUMNS} FROM message_events e JOIN journal j ON j.seq = e.seq"
        " WHERE e.message_id = ? ORDER BY e.seq", (row[0],))]
    return record


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(status): int(n) for status, n in conn.execute(
        "SELECT coalesce(status, 'none'), count(*) FROM messages GROUP BY 1 ORDER BY 1")}


def overdue_cutoff(overdue_after: float, now: dt.datetime | None = None) -> str:
    """The `sent_at` before which a message that is not final is overdue."""
    now = now or dt.datetime.now(dt.UTC)
    return (now - dt.timedelta(seconds=overdue_after)).isoformat(timespec="microseconds")


def overdue_backlog(conn: sqlite3.Connection, sent_before: str) -> tuple[int, str | None]:
    """How many messages are overdue (a SID, not final, sent before the cutoff) and when
    the oldest of them was sent."""
    count, oldest = conn.execute(
        f"SELECT count(*), min(sent_at) FROM messages WHERE sid IS NOT NULL AND sent_at < ?"
        f" AND status NOT IN ({', '.join('?' * len(FINAL))})",
        (sent_before, *sorted(FINAL))).fetchone()
    return int(count), oldest


def journal_size(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0])
