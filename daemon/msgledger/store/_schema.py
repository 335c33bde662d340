"""The SQLite schema and how every connection to it is opened.

`journal` is the record: append-only (triggers refuse UPDATE and DELETE) and hash-chained.
`messages` and `message_events` are the projection, rebuilt from the journal at will.
WAL with synchronous=FULL: a COMMIT returns only once the WAL is fsynced.

Schema versions: 1 had no poll schedule; 2 adds `polls`, `next_poll_at` and `poll_from` to
`messages`, and the poller's indexes; 3 adds the reconciler's indexes (a day's messages,
and its runs in the journal); 4 adds both sides of a conversation: `direction`,
`in_reply_to`, `received_at`, the media list and when the fetcher is due (`media_due`), and
`media_files`, the media bytes kept beside the journal, where a purge can erase them. The
writer upgrades an older store when it opens it
(`upgrade`), in one transaction; readers read only the current version.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import NamedTuple

from ._file import StoreError
from ._fold import MessageState, poll_from

SCHEMA_VERSION = 4
UPGRADABLE = 1  # the oldest version the writer upgrades in place
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
                   "updated_at", "sent_at", "polls", "next_poll_at", "poll_from", "last_seq",
                   "direction", "in_reply_to", "received_at", "media", "media_due")


# The poller's two work lists, holding only messages it may poll (`poll_from` is set: a
# SID, not final, not given up): those never polled by age, those polled by their next
# poll time (and their age, so the backlog's oldest needs no table lookup).
POLL_INDEXES = """
CREATE INDEX IF NOT EXISTS messages_first_poll ON messages (poll_from)
    WHERE poll_from IS NOT NULL AND polls = 0;
CREATE INDEX IF NOT EXISTS messages_next_poll ON messages (next_poll_at, poll_from)
    WHERE poll_from IS NOT NULL AND polls > 0;
"""

# The reconciler's: the messages of a UTC day (by when Twilio had them, else when first
# seen: `DAY_OF` is the expression its queries must repeat to use the index), and the
# journal's run events, a handful among millions (their kinds: `RUN_KINDS`).
DAY_OF = "coalesce(sent_at, created_at)"
RUN_KINDS = ("reconcile_started", "reconcile_export_job", "reconcile_run")
RUN_KINDS_SQL = "kind IN ('reconcile_started', 'reconcile_export_job', 'reconcile_run')"
RECONCILE_INDEXES = f"""
CREATE INDEX IF NOT EXISTS messages_by_day ON messages ({DAY_OF});
CREATE INDEX IF NOT EXISTS journal_runs ON journal (seq) WHERE {RUN_KINDS_SQL};
"""

# Version 4's: the messages that answer one (a reply links to what it answers), the media
# fetcher's work list, and the kept media files, one row per file of a message.
CONVERSATION_COLUMNS = ("direction TEXT", "in_reply_to TEXT", "received_at TEXT", "media TEXT",
                        "media_due TEXT")
CONVERSATION_TABLES = """
CREATE INDEX IF NOT EXISTS messages_in_reply_to ON messages (in_reply_to)
    WHERE in_reply_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_media_due ON messages (media_due)
    WHERE media_due IS NOT NULL;
CREATE TABLE IF NOT EXISTS media_files (
    sid          TEXT NOT NULL,
    n            INTEGER NOT NULL,
    content_type TEXT,
    sha256       TEXT NOT NULL,
    bytes        BLOB NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (sid, n)
);
"""


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
    polls                 INTEGER NOT NULL DEFAULT 0,
    next_poll_at          TEXT,
    poll_from             TEXT,
    last_seq              INTEGER NOT NULL,
    direction             TEXT,
    in_reply_to           TEXT,
    received_at           TEXT,
    media                 TEXT,
    media_due             TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_status ON messages (status, sent_at);
CREATE INDEX IF NOT EXISTS messages_by_created ON messages (created_at);
{POLL_INDEXES}
{RECONCILE_INDEXES}
{CONVERSATION_TABLES}
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


def prepare(conn: sqlite3.Connection, path: str) -> int | None:
    """Make the writer's database the store: refuse one that holds something else (before
    anything is written to it), then WAL, and the tables if it is new or an upgrade if it
    is older. The version it was upgraded from, if it was."""
    version = store_version(conn, path, oldest=UPGRADABLE)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    if version is None:
        create(conn)
    elif version < SCHEMA_VERSION:
        upgrade(conn, version)
        return version
    return None


def check_store(conn: sqlite3.Connection, path: str) -> bool:
    """Whether the database holds a msgledger store this version reads (False: it holds
    nothing yet); StoreError if it holds anything else."""
    return store_version(conn, path) is not None


def store_version(conn: sqlite3.Connection, path: str, *,
                  oldest: int = SCHEMA_VERSION) -> int | None:
    """The schema version of the store the database holds (None: it holds nothing yet);
    StoreError if it holds anything else, or a version outside [oldest, SCHEMA_VERSION]."""
    tables = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        return None
    if not STORE_TABLES.issubset(tables):
        others = ", ".join(sorted(tables - STORE_TABLES)[:3]) or "only some of its tables"
        raise StoreError(path, f"not a msgledger store (it holds {others})")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    found = None if row is None else row[0]
    if not (isinstance(found, str) and found.isdigit()
            and oldest <= int(found) <= SCHEMA_VERSION):
        raise StoreError(path, _version_problem(found))
    return int(found)


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
    return (f"schema version {version} is older than this msgledger reads ({SCHEMA_VERSION}):"
            " `msgledger run` upgrades it when it opens it")


def create(conn: sqlite3.Connection) -> None:
    """Create the tables and record the schema version, all in one transaction: a crash
    part-way leaves an empty database, never tables without their version."""
    conn.executescript(f"BEGIN IMMEDIATE;\n{DDL}\nINSERT INTO meta VALUES"
                       f" ('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;")


def upgrade(conn: sqlite3.Connection, version: int) -> None:
    """From `version` to the current one, step by step, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version < 2:
            _add_poll_schedule(conn)
        if version < 3:
            _run_statements(conn, RECONCILE_INDEXES)
        if version < 4:
            _add_conversations(conn)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _add_poll_schedule(conn: sqlite3.Connection) -> None:
    """Version 1 to 2: the poll schedule's columns and indexes. No version-1 store holds a
    poll, so every message starts unpolled, due by its age."""
    for column in ("polls INTEGER NOT NULL DEFAULT 0", "next_poll_at TEXT", "poll_from TEXT"):
        conn.execute(f"ALTER TABLE messages ADD COLUMN {column}")
    rows = conn.execute("SELECT id, sid, status, flags, created_at, sent_at FROM messages")
    conn.executemany("UPDATE messages SET poll_from = ? WHERE id = ?",
                     [(due, message_id) for message_id, *state in rows
                      if (due := _poll_from_row(*state)) is not None])
    _run_statements(conn, POLL_INDEXES)


# The fold's direction (`_fold._direction`) for a stored message: the first of its events
# that states one, by its data's `direction` (a reconciled row: Twilio's) or by its kind.
_FIRST_DIRECTION = """
UPDATE messages SET direction = (
    SELECT CASE WHEN json_type(j.data, '$.direction') = 'text'
                     AND json_extract(j.data, '$.direction') != ''
                THEN json_extract(j.data, '$.direction') ELSE 'outbound-api' END
    FROM message_events e JOIN journal j ON j.seq = e.seq
    WHERE e.message_id = messages.id AND (
        (json_type(j.data, '$.direction') = 'text' AND json_extract(j.data, '$.direction') != '')
        OR j.kind IN ('send_requested', 'send_accepted', 'send_rejected', 'send_unknown',
                      'register'))
    ORDER BY e.seq LIMIT 1)
"""


def _add_conversations(conn: sqlite3.Connection) -> None:
    """Version 3 to 4: the new columns, with each message's direction as a replay would
    fold it (no version-3 store holds an inbound message or media)."""
    for column in CONVERSATION_COLUMNS:
        conn.execute(f"ALTER TABLE messages ADD COLUMN {column}")
    conn.execute(_FIRST_DIRECTION)
    _run_statements(conn, CONVERSATION_TABLES)


def _run_statements(conn: sqlite3.Connection, script: str) -> None:
    """Each statement of `script` inside the open transaction (executescript would COMMIT
    first)."""
    for statement in filter(str.strip, script.split(";")):
        conn.execute(statement)


def _poll_from_row(sid: str | None, status: str | None, flags: str, created_at: str,
                   sent_at: str | None) -> str | None:
    """The fold's `poll_from` for a stored row (the same rule: `_fold.poll_from`)."""
    state = MessageState(sid=sid, status=status, flags=frozenset(json.loads(flags)),
                         created_at=created_at, sent_at=sent_at)
    return poll_from(state)
