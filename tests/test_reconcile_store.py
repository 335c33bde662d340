"""The reconciler's store: schema 3's indexes serve its queries, and a schema-2 store is
upgraded to it in place (docs/design.md, "The daily reconciler", "Schema 3")."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

from msgledger import store
from msgledger.events import Event
from msgledger.store import _reconcile as queries
from msgledger.store._schema import SCHEMA_VERSION

from .older_stores import downgrade

DAY_START, DAY_END = "2026-10-20T00:00:00", "2026-10-21T00:00:00"


def at(hour: int, day: int = 20) -> str:
    return dt.datetime(2026, 10, day, hour, tzinfo=dt.UTC).isoformat(timespec="microseconds")


def sid(n: int) -> str:
    return f"SM{n:032x}"


def filled(path: Path) -> None:
    writer = store.JournalWriter.open(str(path))
    writer.append([
        Event("register", "register", at(9), sid=sid(1), status="sent", data={"to": "+1555"}),
        Event("register", "register", at(23, day=19), sid=sid(2), status="sent"),
        Event("send_requested", "api", at(10), ref="lost", status="requested",
              data={"to": "+15558675310", "from": "+15005550001"}),
        Event("send_unknown", "api", at(10), ref="lost", status="outcome_unknown"),
        Event("reconcile_started", "reconcile", at(11), data={"run_id": "RN1"}),
        Event("reconcile_run", "reconcile", at(12), data={"run_id": "RN1", "status": "done"}),
    ])
    writer.close()


def plan(conn: sqlite3.Connection, sql: str, *args: object) -> str:
    return " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))


def test_the_day_and_run_queries_read_their_indexes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    filled(path)
    conn = store.connect(str(path), readonly=True)
    try:
        day = plan(conn, "SELECT id FROM messages WHERE coalesce(sent_at, created_at) >= ?"
                   " AND coalesce(sent_at, created_at) < ? AND id > ? ORDER BY id LIMIT 9",
                   DAY_START, DAY_END, 0)
        runs = plan(conn, f"SELECT seq FROM journal WHERE {queries.RUN_KINDS_SQL} AND seq < ?"
                    " ORDER BY seq DESC LIMIT 9", 99)
        assert [m.sid for m in queries.day_messages(conn, DAY_START, DAY_END, 0)] == [sid(1),
                                                                                   None]
        assert queries.day_count(conn, DAY_START, DAY_END) == 2
        [lost] = queries.unknown_sends(conn, DAY_START, DAY_END)
        assert (lost.ref, lost.to) == ("lost", "+15558675310")
        assert [e.kind for e in queries.iter_run_events(conn)] == ["reconcile_run",
                                                                   "reconcile_started"]
        assert set(queries.known_sids(conn, [sid(1), sid(9)])) == {sid(1)}
    finally:
        conn.close()
    assert "messages_by_day" in day, day
    assert "journal_runs" in runs, runs


def test_a_schema_2_store_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    filled(path)
    downgrade(path, 2)
    assert "schema version 2 is older" in store.verify(str(path)).reason
    writer = store.JournalWriter.open(str(path))
    assert writer.upgraded_from == 2
    writer.close()
    conn = sqlite3.connect(path)
    indexes = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert {"messages_by_day", "journal_runs"} <= indexes
    assert version == (str(SCHEMA_VERSION),)
    assert store.verify(str(path)).ok
