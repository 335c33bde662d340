"""The SQLite store on real files: the append-only hash-chained journal, the projection the
journal writer keeps beside it, `verify`, and the read queries."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgledger import store
from msgledger.events import Event
from msgledger.store._chain import row_hash

SID_X = "SM" + "1" * 32
SID_Y = "SM" + "2" * 32


def at(day: int, second: int = 0) -> str:
    return f"2024-05-{day:02d}T10:00:{second:02d}.000000+00:00"


def callback(sid: str, status: str, when: str, ref: str | None = None) -> Event:
    params = [["MessageSid", sid], ["MessageStatus", status], ["To", "+15005550006"]]
    return Event("callback", "callback", when, sid=sid, ref=ref, status=status,
                 data={"params": params, "url": "https://ledger.example.com/twilio/status"})


def requested(ref: str, when: str) -> Event:
    return Event("send_requested", "api", when, ref=ref, status="requested",
                 data={"to": "+15005550006", "from": "+15005550001", "body": "hello"})


def accepted(sid: str, ref: str, when: str, status: str = "queued") -> Event:
    return Event("send_accepted", "api", when, sid=sid, ref=ref, status=status,
                 data={"sid": sid, "status": status})


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.db")


@pytest.fixture
def writer(path: str) -> Iterator[store.JournalWriter]:
    w = store.JournalWriter.open(path)
    yield w
    w.close()


def five_events(writer: store.JournalWriter) -> None:
    """Two messages, five events: ref-1 -> SID_X sent then delivered; SID_Y queued then failed."""
    writer.append([requested("ref-1", at(1, 1)), accepted(SID_X, "ref-1", at(1, 2))])
    writer.append([callback(SID_Y, "queued", at(1, 3)), callback(SID_X, "delivered", at(1, 4)),
                   callback(SID_Y, "failed", at(1, 5))])


def raw(path: str) -> sqlite3.Connection:
    """A plain connection in autocommit mode, as someone tampering with the file would use."""
    return sqlite3.connect(path, isolation_level=None)


def tamper(path: str, *statements: str) -> None:
    conn = raw(path)
    try:
        conn.execute("DROP TRIGGER journal_refuses_update")
        conn.execute("DROP TRIGGER journal_refuses_delete")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


# --- the journal


def test_append_returns_consecutive_seqs_from_one(writer: store.JournalWriter) -> None:
    """Sequence numbers start at 1 and run on without gaps across batches."""
    assert writer.last_seq == 0
    assert writer.append([requested("r1", at(1)), requested("r2", at(1))]) == [1, 2]
    assert writer.append([requested("r3", at(1))]) == [3]
    assert writer.last_seq == 3


def test_reopening_continues_the_chain(path: str) -> None:
    """A writer opened on an existing store appends after its last row, on the same chain."""
    first = store.JournalWriter.open(path)
    first.append([requested("r1", at(1)), requested("r2", at(1))])
    first.close()
    second = store.JournalWriter.open(path)
    try:
        assert second.last_seq == 2
        assert second.append([requested("r3", at(1))]) == [3]
    finally:
        second.close()
    assert store.verify(path) == store.VerifyResult(True, 3, 3)


def test_failed_batch_leaves_nothing(writer: store.JournalWriter, path: str) -> None:
    """A batch that fails part-way journals none of its events and the next one carries on."""
    writer.append([requested("r1", at(1))])
    unserialisable = Event("register", "register", at(1), sid=SID_X, data={"x": object()})
    with pytest.raises(TypeError):
        writer.append([requested("r2", at(1)), unserialisable])
    assert writer.append([requested("r3", at(1))]) == [2]
    conn = raw(path)
    assert conn.execute("SELECT ref FROM journal ORDER BY seq").fetchall() == [("r1",), ("r3",)]
    assert conn.execute("SELECT count(*) FROM messages").fetchone() == (2,)
    conn.close()
    assert store.verify(path).ok


@pytest.mark.parametrize("sql", ["UPDATE journal SET status = 'delivered' WHERE seq = 1",
                                 "DELETE FROM journal WHERE seq = 1",
                                 "DELETE FROM journal"])
def test_database_refuses_changes_to_the_journal(writer: store.JournalWriter, path: str,
                                                 sql: str) -> None:
    """Any connection, not just msgledger's, is refused UPDATE and DELETE on the journal."""
    writer.append([requested("r1", at(1))])
    conn = raw(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
        assert conn.execute("SELECT count(*), max(status) FROM journal").fetchone() == \
            (1, "requested")
    finally:
        conn.close()


def test_event_naming_no_message_is_journal_only(writer: store.JournalWriter, path: str) -> None:
    """An event with neither SID nor ref is journaled but creates no message."""
    alert = Event("debugger", "debugger", at(1), data={"params": [["Sid", "NO123"]]})
    assert writer.append([alert]) == [1]
    assert store.verify(path) == store.VerifyResult(True, 1, 0)


# --- verify


def test_verify_passes_on_a_good_store(writer: store.JournalWriter, path: str) -> None:
    """An untouched store verifies, counting its events and messages."""
    five_events(writer)
    assert store.verify(path) == store.VerifyResult(True, 5, 2)


def test_verify_passes_on_an_empty_store(writer: store.JournalWriter, path: str) -> None:
    """A store with nothing in it yet verifies."""
    assert store.verify(path) == store.VerifyResult(True, 0, 0)


def test_verify_fails_on_a_missing_store(tmp_path: Path) -> None:
    """A path with no store behind it does not verify (and is not created)."""
    result = store.verify(str(tmp_path / "absent.db"))
    assert not result.ok
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize(("sql", "bad_seq"), [
    # changing one journal row's data is found at that row
    ("""UPDATE journal SET data = '{"sid":"x","status":"failed"}' WHERE seq = 2""", 2),
    # changing a row's indexed status column (not its data) is found at that row
    ("UPDATE journal SET status = 'delivered' WHERE seq = 5", 5),
    # deleting a row from the middle is found as the gap in the sequence
    ("DELETE FROM journal WHERE seq = 3", 3),
    # deleting the very first row is found at sequence number 1
    ("DELETE FROM journal WHERE seq = 1", 1),
    # deleting the newest row leaves a valid chain, but the projection still betrays it
    ("DELETE FROM journal WHERE seq = 5", 5),
], ids=["edited-data", "edited-status", "deleted-middle", "deleted-first", "truncated-tail"])
def test_verify_names_the_tampered_row(writer: store.JournalWriter, path: str, sql: str,
                                       bad_seq: int) -> None:
    """Any edit or deletion of a journal row makes verify fail, naming that row."""
    five_events(writer)
    writer.close()
    tamper(path, sql)
    result = store.verify(path)
    assert (result.ok, result.first_bad_seq) == (False, bad_seq)


def test_verify_names_an_edited_projection(writer: store.JournalWriter, path: str) -> None:
    """A message row edited behind the journal's back is found, at the message's last event."""
    five_events(writer)
    writer.close()
    conn = raw(path)
    conn.execute(f"UPDATE messages SET status = 'failed' WHERE sid = '{SID_X}'")
    conn.close()
    result = store.verify(path)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "projection" in result.reason


def test_verify_names_a_moved_event(writer: store.JournalWriter, path: str) -> None:
    """An event re-linked to another message is found."""
    five_events(writer)
    writer.close()
    conn = raw(path)
    conn.execute("UPDATE message_events SET message_id = (SELECT id FROM messages"
                 f" WHERE sid = '{SID_Y}') WHERE seq = 4")
    conn.close()
    result = store.verify(path)
    assert (result.ok, result.first_bad_seq) == (False, 4)


def test_writer_refuses_an_edited_tail(writer: store.JournalWriter, path: str) -> None:
    """Opening a store whose recent rows were edited raises ChainBroken at the edited row."""
    five_events(writer)
    writer.close()
    tamper(path, "UPDATE journal SET at = '2024-05-01T00:00:00.000000+00:00' WHERE seq = 4")
    with pytest.raises(store.ChainBroken) as broken:
        store.JournalWriter.open(path)
    assert broken.value.seq == 4


def test_writer_refuses_a_broken_link(writer: store.JournalWriter, path: str) -> None:
    """A row whose prev_hash does not match the row before it raises ChainBroken there."""
    five_events(writer)
    writer.close()
    tamper(path, "UPDATE journal SET prev_hash = '" + "f" * 64 + "' WHERE seq = 3")
    with pytest.raises(store.ChainBroken) as broken:
        store.JournalWriter.open(path)
    assert broken.value.seq == 3


def rehash_edit(path: str, seq: int, status: str) -> None:
    """Edit row `seq`'s status and give it a hash that fits its new content, as a careful
    forger would; the rows after it are left alone."""
    conn = raw(path)
    row = conn.execute("SELECT seq, at, kind, source, sid, ref, status, data, prev_hash"
                       " FROM journal WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    seq, when, kind, source, sid, ref, _, data, prev = row
    digest = row_hash(prev, seq, when, kind, source, sid, ref, status, data)
    tamper(path, f"UPDATE journal SET status = '{status}', hash = '{digest}' WHERE seq = {seq}")


def test_verify_finds_a_rehashed_edit(writer: store.JournalWriter, path: str) -> None:
    """An edited row re-hashed to fit no longer links to the next row, which is named."""
    five_events(writer)
    writer.close()
    rehash_edit(path, 3, "delivered")
    result = store.verify(path)
    assert (result.ok, result.first_bad_seq) == (False, 4)


def test_writer_refuses_a_rehashed_edit(writer: store.JournalWriter, path: str) -> None:
    """The writer's tail check follows the links too, not only each row's own hash."""
    five_events(writer)
    writer.close()
    rehash_edit(path, 3, "delivered")
    with pytest.raises(store.ChainBroken) as broken:
        store.JournalWriter.open(path)
    assert broken.value.seq == 4


# --- which message an event belongs to


def test_callback_before_send_is_merged(writer: store.JournalWriter, path: str) -> None:
    """A callback that arrives before its send's SID is journaled ends up in that message."""
    writer.append([callback(SID_X, "sent", at(1, 3))])
    writer.append([requested("ref-1", at(1, 1))])
    writer.append([accepted(SID_X, "ref-1", at(1, 2))])
    conn = store.connect(path, readonly=True)
    assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    record = store.find_record(conn, "ref-1")
    conn.close()
    assert record is not None
    assert (record["sid"], record["ref"], record["status"]) == (SID_X, "ref-1", "sent")
    assert (record["to"], record["from"]) == ("+15005550006", "+15005550001")
    assert [h["seq"] for h in record["history"]] == [1, 2, 3]
    assert (record["created_at"], record["updated_at"]) == (at(1, 1), at(1, 3))
    assert store.verify(path) == store.VerifyResult(True, 3, 1)


def test_ref_naming_another_sid_is_kept_apart(writer: store.JournalWriter, path: str) -> None:
    """An event whose ref already belongs to another SID makes its own message, flagged."""
    writer.append([accepted(SID_X, "ref-1", at(1, 1))])
    writer.append([callback(SID_Y, "delivered", at(1, 2), ref="ref-1")])
    conn = store.connect(path, readonly=True)
    x, y = store.find_record(conn, SID_X), store.find_record(conn, SID_Y)
    conn.close()
    assert x is not None and y is not None
    assert (x["ref"], x["status"], x["flags"]) == ("ref-1", "queued", [])
    assert (y["ref"], y["status"], y["flags"]) == (None, "delivered", ["ref_conflict"])
    assert [h["seq"] for h in y["history"]] == [2]
    assert store.verify(path) == store.VerifyResult(True, 2, 2)


def test_ref_conflict_with_a_known_sid(writer: store.JournalWriter, path: str) -> None:
    """A conflicting ref on a callback for a SID that already has a message does not merge
    the two messages: each SID keeps its own record and the second is flagged."""
    writer.append([accepted(SID_X, "ref-1", at(1, 1))])
    writer.append([callback(SID_Y, "sent", at(1, 2))])
    writer.append([callback(SID_Y, "delivered", at(1, 3), ref="ref-1")])
    conn = store.connect(path, readonly=True)
    x, y = store.find_record(conn, SID_X), store.find_record(conn, SID_Y)
    conn.close()
    assert x is not None and x["status"] == "queued"
    assert y is not None and y["status"] == "delivered"
    assert "ref_conflict" in y["flags"]
    assert [h["seq"] for h in y["history"]] == [2, 3]


def test_merge_keeps_a_ref_conflict_apart(writer: store.JournalWriter, path: str) -> None:
    """A message kept apart for naming another send's ref, later merged into its own send,
    neither takes that ref along (it is the other record's) nor loses its flag."""
    writer.append([accepted(SID_Y, "ref-1", at(1, 1))])
    writer.append([accepted(SID_X, "ref-1", at(1, 2))])  # ref-1 is SID_Y's: kept apart
    writer.append([requested("ref-2", at(1, 3))])
    writer.append([accepted(SID_X, "ref-2", at(1, 4))])  # X's send: the two rows merge
    conn = store.connect(path, readonly=True)
    x = store.find_record(conn, SID_X)
    conn.close()
    assert x is not None and x["ref"] == "ref-2"
    assert "ref_conflict" in x["flags"]
    assert [h["seq"] for h in x["history"]] == [2, 3, 4]
    assert store.verify(path).ok


def test_duplicate_callbacks_are_all_kept(writer: store.JournalWriter, path: str) -> None:
    """The same callback twice is journaled twice and both stay in the history."""
    writer.append([callback(SID_X, "delivered", at(1, 1))])
    writer.append([callback(SID_X, "delivered", at(1, 1))])
    conn = store.connect(path, readonly=True)
    record = store.find_record(conn, SID_X)
    conn.close()
    assert record is not None
    assert [h["seq"] for h in record["history"]] == [1, 2]


# --- reading


def test_find_record_by_sid_and_by_ref(writer: store.JournalWriter, path: str) -> None:
    """A record is found by its SID and by its ref, with its whole history oldest first."""
    five_events(writer)
    conn = store.connect(path, readonly=True)
    by_sid, by_ref = store.find_record(conn, SID_X), store.find_record(conn, "ref-1")
    missing = store.find_record(conn, "nothing")
    conn.close()
    assert by_sid == by_ref
    assert missing is None
    assert by_sid is not None
    assert (by_sid["sid"], by_sid["ref"], by_sid["status"], by_sid["final"]) == \
        (SID_X, "ref-1", "delivered", True)
    assert [(h["seq"], h["at"], h["source"], h.get("status")) for h in by_sid["history"]] == [
        (1, at(1, 1), "api", "requested"), (2, at(1, 2), "api", "queued"),
        (4, at(1, 4), "callback", "delivered")]
    assert by_sid["history"][2]["data"]["params"][0] == ["MessageSid", SID_X]


def test_iter_records_since_until(writer: store.JournalWriter, path: str) -> None:
    """`iter_records` yields the messages created in [since, until), first seen first, each
    with its whole history, even events from after `until`."""
    writer.append([callback("SM" + "a" * 32, "sent", at(1)), callback("SM" + "b" * 32, "sent",
                   at(2)), callback("SM" + "c" * 32, "sent", at(3))])
    writer.append([callback("SM" + "a" * 32, "delivered", at(4))])
    conn = store.connect(path, readonly=True)

    def sids(since: str | None, until: str | None) -> list[tuple[str, int]]:
        conn.execute("BEGIN")
        try:
            return [(r["sid"][2], len(r["history"]))
                    for r in store.iter_records(conn, since, until)]
        finally:
            conn.execute("COMMIT")

    assert sids(None, None) == [("a", 2), ("b", 1), ("c", 1)]
    assert sids("2024-05-02", None) == [("b", 1), ("c", 1)]
    assert sids(None, "2024-05-02") == [("a", 2)]
    assert sids("2024-05-02", "2024-05-03") == [("b", 1)]
    assert sids("2024-05-04", None) == []
    conn.close()


def test_status_counts_and_journal_size(writer: store.JournalWriter, path: str) -> None:
    """Counts by current status and the journal's length, as `msgledger status` reports them."""
    five_events(writer)
    writer.append([Event("debugger", "debugger", at(2), sid="SM" + "9" * 32)])
    conn = store.connect(path, readonly=True)
    assert store.status_counts(conn) == {"delivered": 1, "failed": 1, "none": 1}
    assert store.journal_size(conn) == 6
    conn.close()


def test_batches_fold_like_one_replay(path: str) -> None:
    """Events spread over many batches, merges included, give the same projection as the
    replay `verify` does: states are read back from the table between batches."""
    writer = store.JournalWriter.open(path)
    sids = [f"SM{n:032x}" for n in range(6)]
    writer.append([callback(sid, "sent", at(1, n)) for n, sid in enumerate(sids)])
    writer.append([requested(f"ref-{n}", at(2, n)) for n in range(6)])
    for n, sid in enumerate(sids):  # each send's SID now joins the earlier callback's message
        writer.append([accepted(sid, f"ref-{n}", at(3, n))])
    writer.append([callback(sid, "delivered", at(4, n)) for n, sid in enumerate(sids)])
    writer.close()
    conn = store.connect(path, readonly=True)
    records = [store.find_record(conn, f"ref-{n}") for n in range(6)]
    count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    assert count == 6
    assert [(r["sid"], r["status"], len(r["history"])) for r in records if r] == [
        (sid, "delivered", 4) for sid in sids]
    assert store.verify(path) == store.VerifyResult(True, 24, 6)


def test_verify_after_a_merge_and_a_restart(path: str) -> None:
    """A message id freed by a merge is never reused after the writer restarts, so the
    replay assigns the same ids and `verify` passes."""
    writer = store.JournalWriter.open(path)
    writer.append([requested("ref-1", at(1, 1))])
    writer.append([callback(SID_X, "sent", at(1, 2))])  # no ref: a message of its own
    writer.append([accepted(SID_X, "ref-1", at(1, 3))])  # merges the two, frees an id
    writer.close()
    writer = store.JournalWriter.open(path)
    writer.append([requested("ref-2", at(1, 4))])
    writer.close()
    assert store.verify(path) == store.VerifyResult(True, 4, 2)


@st.composite
def _batched_events(draw: st.DrawFn) -> list[list[Event]]:
    """A few messages' events (sends, callbacks with and without our ref, in any order),
    cut into batches at random."""
    events: list[Event] = []
    for second in range(draw(st.integers(min_value=1, max_value=14))):
        sid, ref = draw(st.sampled_from([SID_X, SID_Y])), draw(st.sampled_from(["r1", "r2"]))
        status = draw(st.sampled_from(["queued", "sent", "delivered", "failed"]))
        make = draw(st.sampled_from(["requested", "accepted", "callback", "callback+ref"]))
        events.append(requested(ref, at(1, second)) if make == "requested"
                      else accepted(sid, ref, at(1, second)) if make == "accepted"
                      else callback(sid, status, at(1, second),
                                    ref=ref if make == "callback+ref" else None))
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=len(events) - 1)))
                  if len(events) > 1 else set())
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=80, deadline=None)
@given(batches=_batched_events())
def test_any_batching_gives_the_replayed_projection(tmp_path_factory: pytest.TempPathFactory,
                                                    batches: list[list[Event]]) -> None:
    """However events are grouped into commits (the writer loads each batch's messages up
    front), the projection equals `verify`'s event-by-event replay."""
    path = str(tmp_path_factory.mktemp("batches") / "ledger.db")
    writer = store.JournalWriter.open(path)
    try:
        for batch in batches:
            writer.append(batch)
    finally:
        writer.close()
    result = store.verify(path)
    assert result.ok, result
    assert result.events == sum(len(b) for b in batches)


def test_a_taken_message_id_fails_loudly(writer: store.JournalWriter, path: str) -> None:
    """If the id counter is behind the table (a hand repair, a restore), a new message
    fails its batch rather than overwriting another message's row."""
    writer.append([callback(SID_X, "sent", at(1, 1))])
    writer.append([callback(SID_Y, "sent", at(1, 2))])
    writer.close()  # one writer at a time: the store is locked while it is open
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE sqlite_sequence SET seq = 1 WHERE name = 'messages'")
    conn.close()
    behind = store.JournalWriter.open(path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            behind.append([callback("SM" + "3" * 32, "sent", at(1, 3))])
    finally:
        behind.close()
    conn = store.connect(path, readonly=True)
    y = store.find_record(conn, SID_Y)
    conn.close()
    assert y is not None and y["status"] == "sent"
