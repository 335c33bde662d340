"""Stores of an older schema, made from a current one by undoing each version's steps
(`msgledger.store._schema`): what a daemon of that version left on disk."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def downgrade(path: Path, version: int) -> None:
    """Make the store at `path` one of schema `version` (2 or 3), its rows kept."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(
            "DROP INDEX messages_in_reply_to; DROP INDEX messages_media_due;"
            " DROP TABLE media_files;"
            + "".join(f" ALTER TABLE messages DROP COLUMN {column};" for column in
                      ("direction", "in_reply_to", "received_at", "media", "media_due")))
        if version < 3:
            conn.executescript("DROP INDEX messages_by_day; DROP INDEX journal_runs;")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        conn.commit()
    finally:
        conn.close()
