"""The SQLite schema and how every connection to it is opened.

`journal` is the record: append-only (triggers refuse UPDATE and DELETE) and hash-chained.
`messages` and `message_events` are the projection, rebuilt from the journal at will.
WAL with synchronous=FULL: a COMMIT returns only once the WAL is fsynced.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64  # the `prev_hash` of sequence number 1
BUSY_TIMEOUT_MS = 5000  # a checkpoint or an exporter may hold a lock briefly

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS journal (
    seq       INTEGER PRIMARY KEY,
    at        TEXT NOT NULL,
    kind      TEXT NOT NULL,
    source    TEXT NOT NULL,
    sid       TEXT,
    ref       TEXT,
    status    TEXT,
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS journal_refuses_update BEFORE UPDATE ON journal
BEGIN SELECT RAISE(ABORT, 'journal is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS journal_refuses_delete BEFORE DELETE ON journal
BEGIN SELECT RAISE(ABORT, 'journal is append-only: DELETE refused'); END;

-- AUTOINCREMENT: an id freed by a merge is never handed out again, so the ids a replay
-- assigns match the stored ones however often the writer restarted.
CREATE TABLE IF NOT EXISTS messages (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    sid                   TEXT UNIQUE,
    ref                   TEXT UNIQUE,
    to_number             TEXT,
    from_number           TEXT,
    messaging_service_sid TEXT,
    body                  TEXT,
    body_sha256           TEXT,
    status                TEXT,
    error_code            TEXT,
    terminals             TEXT NOT NULL,
    flags                 TEXT NOT NULL,
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL,
    sent_at               TEXT,
    last_seq              INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_status ON messages (status, sent_at);
CREATE INDEX IF NOT EXISTS messages_by_created ON messages (created_at);

CREATE TABLE IF NOT EXISTS message_events (
    seq        INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS message_events_by_message ON message_events (message_id, seq);
"""


def connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode; callers open their own transactions.

    `check_same_thread=False` because Trio's worker threads vary; the owner guarantees that
    one thread at a time uses it (a CapacityLimiter of 1).
    """
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def create(conn: sqlite3.Connection) -> None:
    """Create the tables if they are missing and check the schema version."""
    conn.executescript(DDL)
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) != SCHEMA_VERSION:
        raise RuntimeError(f"store schema version {row[0]}, this msgledger reads {SCHEMA_VERSION}")
