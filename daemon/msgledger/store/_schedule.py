"""The poller's work lists, read from the projection (docs/design.md, "The overdue poller").

A message is the poller's while `poll_from` is set (a SID, not final, not given up). Never
polled, it is due once its age passes `poller.overdue_after`; polled, once the time its last
answer set (`next_poll_at`) has come. Each list is read through its own partial index, in
pages ordered by a unique key, so a pass never holds the whole backlog and never sees a
message twice while the journal moves messages out of the lists behind it.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

# Which of the two lists a message was found in, and its place there: the cursor of a page.
Cursor = tuple[str, int]  # (poll_from or next_poll_at, id)
NO_CURSOR: Cursor = ("", 0)


class DueMessage(NamedTuple):
    """One message the poller should fetch now."""

    id: int
    sid: str
    status: str | None  # as the record has it before this poll
    poll_from: str  # when its age counts from (ISO 8601, UTC)
    polls: int
    cursor: Cursor


# The WHERE terms repeat the indexes' own (`_schema.POLL_INDEXES`), so SQLite reads them.
_FIRST = ("SELECT id, sid, status, poll_from, polls, poll_from FROM messages"
          " WHERE poll_from IS NOT NULL AND polls = 0 AND poll_from <= ?"
          " AND (poll_from, id) > (?, ?) ORDER BY poll_from, id LIMIT ?")
_AGAIN = ("SELECT id, sid, status, poll_from, polls, next_poll_at FROM messages"
          " WHERE poll_from IS NOT NULL AND polls > 0 AND next_poll_at <= ?"
          " AND (next_poll_at, id) > (?, ?) ORDER BY next_poll_at, id LIMIT ?")


def first_polls(conn: sqlite3.Connection, older_than: str, after: Cursor,
                limit: int) -> list[DueMessage]:
    """Messages never polled whose age counts from before `older_than`, after `after`."""
    return _page(conn, _FIRST, older_than, after, limit)


def repolls(conn: sqlite3.Connection, now: str, after: Cursor,
            limit: int) -> list[DueMessage]:
    """Messages polled before whose next poll time is not after `now`, after `after`."""
    return _page(conn, _AGAIN, now, after, limit)


def _page(conn: sqlite3.Connection, query: str, bound: str, after: Cursor,
          limit: int) -> list[DueMessage]:
    return [DueMessage(int(i), str(sid), status, str(start), int(polls), (str(key), int(i)))
            for i, sid, status, start, polls, key in conn.execute(
                query, (bound, *after, limit))]


def poll_backlog(conn: sqlite3.Connection, older_than: str) -> tuple[int, str | None]:
    """How many messages are overdue (the poller's, and past their first poll time) and
    when the oldest one's age counts from. Polled ones are overdue by definition."""
    first, first_oldest = conn.execute(
        "SELECT count(*), min(poll_from) FROM messages"
        " WHERE poll_from IS NOT NULL AND polls = 0 AND poll_from <= ?",
        (older_than,)).fetchone()
    again, again_oldest = conn.execute(
        "SELECT count(*), min(poll_from) FROM messages"
        " WHERE poll_from IS NOT NULL AND polls > 0").fetchone()
    oldest = min((t for t in (first_oldest, again_oldest) if t is not None), default=None)
    return int(first) + int(again), oldest
