"""The media fetcher's work list and the kept files, read from the store.

A message is the fetcher's while `media_due` is set: it has a SID and a file still
`pending` (never tried, or failed and due again at its `retry_at`). The list is read
through its partial index, earliest due first.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from ._fold_media import PENDING, MediaItem, media_from_json

_DUE = ("SELECT sid, direction, media FROM messages WHERE media_due IS NOT NULL"
        " AND media_due <= ? ORDER BY media_due, id LIMIT ?")


@dataclass(frozen=True)
class MediaWork:
    """A message with media the fetcher should fetch now."""

    sid: str
    direction: str | None
    due: tuple[MediaItem, ...]  # its pending files whose time has come


def due_media(conn: sqlite3.Connection, now: str, limit: int) -> list[MediaWork]:
    """Up to `limit` messages with a file due by `now` (ISO 8601, UTC), earliest first."""
    work = []
    for sid, direction, raw in conn.execute(_DUE, (now, limit)):
        items = media_from_json(json.loads(raw))
        due = tuple(m for m in items if m.state == PENDING and (m.retry_at or "") <= now)
        if due:
            work.append(MediaWork(sid, direction, due))
    return work


def media_file(conn: sqlite3.Connection, sid: str, n: int) -> tuple[str | None, bytes] | None:
    """A kept media file of message `sid`: its content type and bytes; None if not kept."""
    row = conn.execute("SELECT content_type, bytes FROM media_files WHERE sid = ? AND n = ?",
                       (sid, n)).fetchone()
    return None if row is None else (row[0], bytes(row[1]))
