"""The SQLite schema and how every connection to it is opened.

`journal` is the record: append-only (triggers refuse UPDATE and DELETE) and hash-chained.
`messages` and `message_events` are the projection, rebuilt from the journal at will.
WAL with synchronous=FULL: a COMMIT returns only once the WAL is fsynced.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import NamedTuple

from ._file import StoreError

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64  # the `prev_hash` of sequence number 1
BUSY_TIMEOUT_MS = 5000  # a checkpoint or an exporter may hold a lock briefly
STORE_TABLES = frozenset({"meta", "journal", "messages", "message_events"})



class JournalRow(NamedTuple):
    """One journal row, by name. Its fields are the table's columns in order: the one
    definition the DDL, the writer's INSERT and every reader's SELECT are built from."""

    seq: int
    at: str
    kind: str
    source: str
    sid: str | None
    ref: str | None
    status: str | None
    data: str  # the event's data as canonical JSON
    prev_hash: str
    hash: str  # SHA-256 over prev_hash and the row (`_chain.row_hash`)


_JOURNAL_TYPES = {"seq": "INTEGER PRIMARY KEY", "at": "TEXT NOT NULL", "kind": "TEXT NOT NULL",
                  "source": "TEXT NOT NULL", "sid": "TEXT", "ref": "TEXT", "status": "TEXT",
                  "data": "TEXT NOT NULL", "prev_hash": "TEXT NOT NULL",
                  "hash": "TEXT NOT NULL"}
assert tuple(_JOURNAL_TYPES) == JournalRow._fields, "one column list, in one order"
JOURNAL_COLUMNS = ", ".join(JournalRow._fields)


# The columns of `messages` after `id`, in the order the projector writes them.
MESSAGE_COLUMNS = ("sid", "ref", "to_number", "from_number", "messaging_service_sid", "body",
                   "body_sha256", "status", "error_code", "terminals", "flags", "created_at",
                   "updated_at", "sent_at", "last_seq")


def journal_columns(alias: str) -> str:
    """The journal's columns for a SELECT that names the table `alias`."""
    return ", ".join(f"{alias}.{column}" for column in JournalRow._fields)


_JOURNAL_TABLE = ",\n".join(f"    {name:<9} {kind}" for name, kind in _JOURNAL_TYPES.items())

DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS journal (
{_JOURNAL_TABLE}
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


def store_uri(path: str, *, readonly: bool = False) -> str:
    """The SQLite URI of exactly the file `path` names, for the writer and every reader: a
    `?`, `#`, `%` or space in the name is escaped as part of the name, never read as a URI
    parameter (`x.db?mode=memory` would keep nothing on disk). `mode=rw` for the writer:
    the file is already created, 0600, by `_file`, and SQLite must not make another."""
    return f"{Path(path).absolute().as_uri()}?mode={'ro' if readonly else 'rw'}"


def wal_path(path: str) -> str:
    """Where SQLite keeps the store's WAL: beside the file a symlink leads to."""
    return os.path.realpath(path) + "-wal"


def connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode; callers open their own transactions. The writer
    then calls `prepare`.

    `check_same_thread=False` because Trio's worker threads vary; the owner guarantees that
    one thread at a time uses it (a CapacityLimiter of 1).
    """
    conn = sqlite3.connect(store_uri(path, readonly=readonly), uri=True, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def prepare(conn: sqlite3.Connection, path: str) -> None:
    """Make the writer's database the store: refuse one that holds something else (before
    anything is written to it), then WAL, and the tables if it is new."""
    is_store = check_store(conn, path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    if not is_store:
        create(conn)


def check_store(conn: sqlite3.Connection, path: str) -> bool:
    """Whether the database holds a msgledger store this version reads (False: it holds
    nothing yet); StoreError if it holds anything else."""
    tables = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        return False
    if not STORE_TABLES.issubset(tables):
        others = ", ".join(sorted(tables - STORE_TABLES)[:3]) or "only some of its tables"
        raise StoreError(path, f"not a msgledger store (it holds {others})")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None or row[0] != str(SCHEMA_VERSION):
        raise StoreError(path, _version_problem(None if row is None else row[0]))
    return True


def _version_problem(found: object) -> str:
    if found is None:
        return "not a msgledger store (it records no schema version)"
    try:
        version = int(str(found))
    except ValueError:
        return f"not a msgledger store (schema version {found!r})"
    if version > SCHEMA_VERSION:
        return (f"schema version {version} is newer than this msgledger reads"
                f" ({SCHEMA_VERSION}): run a newer msgledger")
    return f"schema version {version} is older than this msgledger reads ({SCHEMA_VERSION})"


def create(conn: sqlite3.Connection) -> None:
    """Create the tables and record the schema version, all in one transaction: a crash
    part-way leaves an empty database, never tables without their version."""
    conn.executescript(f"BEGIN IMMEDIATE;\n{DDL}\nINSERT INTO meta VALUES"
                       f" ('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;")
