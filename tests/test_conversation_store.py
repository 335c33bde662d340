"""Schema 4 in the store: both directions, replies, media and their kept bytes fold as a
replay does; `verify` checks the kept files; a schema-3 store is upgraded in place
(docs/inbound.md, "In the store")."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from msgledger import store
from msgledger.events import Event
from msgledger.store._schema import SCHEMA_VERSION

from .older_stores import downgrade

SID = "MM" + "a" * 32
OURS = "SM" + "b" * 32
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 40


def at(second: int) -> str:
    return f"2026-11-20T10:00:{second:02d}.000000+00:00"


def inbound(second: int, **params: str) -> Event:
    pairs = [("MessageSid", SID), ("From", "+15558675310"), ("To", "+15005550006"),
             ("Body", "hi"), *params.items()]
    return Event("inbound_received", "inbound", at(second), sid=SID, status="received", data={
        "params": pairs, "in_reply_to": OURS, "body_sha256": "h",
        "media": [{"n": 0, "url": "u0", "state": "pending", "content_type": "image/png"},
                  {"n": 1, "url": "u1", "state": "pending"}]})


def archived(second: int, n: int, blob: bytes | None) -> Event:
    data = {"n": n, "content_type": "image/png", "size": len(PNG),
            "sha256": hashlib.sha256(PNG).hexdigest(), "kept": blob is not None}
    return Event("media_archived", "media", at(second), sid=SID, data=data, blob=blob)


def failed(second: int, n: int, retry_at: str | None) -> Event:
    return Event("media_failed", "media", at(second), sid=SID,
                 data={"n": n, "error": "host answered 500", "retry_at": retry_at})


def write(path: Path, events: list[Event]) -> None:
    writer = store.JournalWriter.open(str(path))
    try:
        writer.append(events)
    finally:
        writer.close()


def record(path: Path, key: str = SID) -> store.Record:
    conn = store.connect(str(path), readonly=True)
    try:
        found = store.find_record(conn, key)
        assert found is not None
        return found
    finally:
        conn.close()


def test_an_inbound_message_and_its_media_fold_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write(path, [inbound(1), failed(2, 1, at(30))])
    write(path, [inbound(3, ErrorCode="11200"), archived(4, 0, PNG), archived(5, 0, b"other")])
    found = record(path)
    assert (found["direction"], found["status"], found["in_reply_to"]) == ("inbound",
                                                                         "received", OURS)
    assert found["received_at"] == at(1) and found["updated_at"] == at(5)
    first, second = found["media"]
    assert (first["state"], first["kept"], first["size"]) == ("archived", True, len(PNG))
    assert (second["state"], second["attempts"], second["error"]) == ("pending", 1,
                                                                      "host answered 500")
    conn = store.connect(str(path), readonly=True)
    try:
        assert store.media_file(conn, SID, 0) == ("image/png", PNG)  # the first copy stays
        assert store.media_file(conn, SID, 1) is None
        assert [(w.sid, [m.n for m in w.due]) for w in store.due_media(conn, at(30), 9)] == [
            (SID, [1])]
        assert store.due_media(conn, at(29), 9) == []  # its retry time has not come
    finally:
        conn.close()
    result = store.verify(str(path))
    assert result.ok, result.reason


def test_a_duplicate_webhook_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write(path, [inbound(1)])
    before = record(path)
    write(path, [inbound(2, ErrorCode="11200")])
    after = record(path)
    assert {k: v for k, v in after.items() if k != "history"} == {
        k: v for k, v in before.items() if k != "history"}
    assert len(after["history"]) == 2


def test_media_given_up_on_leaves_the_work_list(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write(path, [inbound(1), archived(2, 0, None), failed(3, 1, None)])
    found = record(path)
    assert [(m["state"], m["kept"]) for m in found["media"]] == [("archived", False),
                                                                 ("failed", False)]
    conn = store.connect(str(path), readonly=True)
    try:
        assert store.due_media(conn, "9999", 9) == []
        assert conn.execute("SELECT media_due FROM messages").fetchone() == (None,)
    finally:
        conn.close()


def test_verify_catches_a_kept_file_that_was_changed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write(path, [inbound(1), archived(2, 0, PNG)])
    conn = sqlite3.connect(path)
    conn.execute("UPDATE media_files SET bytes = ?", (PNG[:-1] + b"\1",))
    conn.commit()
    conn.close()
    result = store.verify(str(path))
    assert not result.ok and "does not match its journaled SHA-256" in result.reason


def test_the_poller_leaves_inbound_messages_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    receiving = Event("callback", "callback", at(1), sid=OURS, status="receiving")
    write(path, [inbound(1), receiving])
    conn = store.connect(str(path), readonly=True)
    try:
        assert conn.execute("SELECT count(*) FROM messages WHERE poll_from IS NOT NULL"
                            ).fetchone() == (0,)
    finally:
        conn.close()


def test_a_schema_3_store_is_upgraded_with_the_directions_a_replay_gives(
        tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    callback_only = "SM" + "c" * 32
    imported = "SM" + "d" * 32
    write(path, [
        Event("send_requested", "api", at(1), ref="r1", status="requested", data={"to": "+1"}),
        Event("send_accepted", "api", at(2), sid=OURS, ref="r1", status="queued"),
        Event("callback", "callback", at(3), sid=callback_only, status="sent",
              data={"params": [["MessageSid", callback_only]]}),
        Event("reconciled", "reconcile", at(4), sid=imported, status="received",
              data={"direction": "inbound", "flags": ["imported"]}),
    ])
    downgrade(path, 3)
    assert "schema version 3 is older" in store.verify(str(path)).reason
    writer = store.JournalWriter.open(str(path))
    assert writer.upgraded_from == 3
    writer.close()
    conn = sqlite3.connect(path)
    directions = dict(conn.execute("SELECT coalesce(sid, ref), direction FROM messages"))
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert directions == {OURS: "outbound-api", callback_only: None, imported: "inbound"}
    assert version == (str(SCHEMA_VERSION),)
    result = store.verify(str(path))
    assert result.ok, result.reason
