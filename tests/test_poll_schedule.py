"""The poll schedule in the store: how the fold keeps it (docs/design.md, "The overdue
poller"), how the poller's work lists read it, and the upgrade of a schema-1 store to it."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgledger import cli, store
from msgledger.events import Event
from msgledger.store import MessageState, _schedule
from msgledger.store._fold import poll_from
from msgledger.store._projector import fold
from msgledger.store._schema import SCHEMA_VERSION

SID = "SM" + "b" * 32
DATA = Path(__file__).parent / "data"
T0 = "2026-11-01T00:00:00.000000+00:00"


def at(hour: int) -> str:
    return f"2026-11-{1 + hour // 24:02d}T{hour % 24:02d}:00:00.000000+00:00"


def callback(status: str, when: str = T0, sid: str = SID) -> Event:
    return Event("callback", "callback", when, sid=sid, status=status,
                 data={"params": [["MessageSid", sid], ["MessageStatus", status]]})


def polled(status: str | None, when: str, *, next_at: str | None = None,
           http_status: int = 200, sid: str = SID) -> Event:
    data: dict[str, object] = {"http_status": http_status, "status": status}
    if next_at is not None:
        data["next_poll_at"] = next_at
    return Event("polled", "poll", when, sid=sid, status=status, data=data)


def gave_up(when: str, sid: str = SID) -> Event:
    return Event("poll_gave_up", "poll", when, sid=sid, data={"polls": 5})


def folded(*events: Event) -> MessageState:
    state = fold(events)
    assert state is not None
    return state


# --- the fold


@settings(max_examples=100, deadline=None)
@given(st.permutations([callback("sent", at(0)), polled("sent", at(12), next_at=at(24)),
                        polled("sent", at(24), next_at=at(48)),
                        polled("sent", at(48), next_at=at(96))]))
def test_polls_and_next_poll_at_ignore_arrival_order(events: list[Event]) -> None:
    """`polls` counts the answers and `next_poll_at` is the latest any of them set."""
    state = folded(*events)
    assert (state.polls, state.next_poll_at) == (3, at(96))
    assert poll_from(state) == at(0)


def test_a_message_is_the_pollers_only_with_a_sid_and_no_final_status() -> None:
    assert poll_from(folded(callback("sent", at(3)))) == at(3)
    assert poll_from(folded(callback("partially_delivered", at(5)))) == at(5)  # no sent_at
    no_sid = Event("send_requested", "api", T0, ref="r", status="requested", data={})
    assert poll_from(folded(no_sid)) is None
    for final in ("delivered", "undelivered", "failed", "canceled", "read"):
        assert poll_from(folded(callback("sent"), polled(final, at(12)))) is None


@pytest.mark.parametrize("order", ["gave_up_first", "final_first"])
def test_a_final_status_withdraws_unconfirmed_in_either_order(order: str) -> None:
    events = [gave_up(at(168)), callback("delivered", at(170))]
    if order == "final_first":
        events.reverse()
    state = folded(callback("sent"), *events)
    assert "unconfirmed" not in state.flags
    assert state.status == "delivered"


def test_giving_up_flags_unconfirmed_and_ends_polling() -> None:
    state = folded(callback("sent"), polled("sent", at(168)), gave_up(at(168)))
    assert "unconfirmed" in state.flags
    assert poll_from(state) is None
    later = folded(callback("sent"), gave_up(at(168)), callback("sent", at(169)))
    assert "unconfirmed" in later.flags  # a status that is not final leaves it


def test_a_404_flags_and_a_later_find_withdraws() -> None:
    lost = folded(callback("sent"), polled(None, at(12), next_at=at(24), http_status=404))
    assert "not_found_at_twilio" in lost.flags
    assert poll_from(lost) == T0  # still polled: one 404 is not proof
    found = folded(callback("sent"), polled(None, at(12), http_status=404),
                   polled("delivered", at(24)))
    assert "not_found_at_twilio" not in found.flags
    assert found.status == "delivered"
    again = folded(callback("sent"), polled("sent", at(12)), polled(None, at(24), http_status=404))
    assert "not_found_at_twilio" in again.flags
    other = folded(callback("sent"), polled(None, at(12), http_status=404),
                   polled(None, at(24), http_status=400))
    assert "not_found_at_twilio" in other.flags  # an answer that is neither leaves it


def test_a_lower_polled_status_changes_nothing() -> None:
    state = folded(callback("delivered"), polled("sent", at(12)))
    assert state.status == "delivered"
    assert state.polls == 1


# --- the work lists


def _write(path: Path, events: list[Event]) -> None:
    writer = store.JournalWriter.open(str(path))
    try:
        writer.append(events)
    finally:
        writer.close()


def _sid(n: int) -> str:
    return f"SM{n:032x}"


def test_work_lists_page_without_repeats(tmp_path: Path) -> None:
    """Never-polled messages come by age up to the cutoff, polled ones by their next poll
    time; pages follow their cursor; final ones and those not due are never listed."""
    path = tmp_path / "s.db"
    events = [callback("sent", at(n), sid=_sid(n)) for n in range(10)]
    events += [callback("delivered", at(1), sid=_sid(1))]
    events += [polled("sent", at(20), next_at=at(30 + n), sid=_sid(n)) for n in (7, 8, 9)]
    _write(path, events)
    conn = store.connect(str(path), readonly=True)
    seen: list[str] = []
    after: store.Cursor = ("", 0)
    while page := store.first_polls(conn, at(5), after, 2):
        seen += [m.sid for m in page]
        after = page[-1].cursor
    assert seen == [_sid(n) for n in (0, 2, 3, 4, 5)]  # 1 is final, 6 too young
    again = store.repolls(conn, at(38), ("", 0), 10)
    assert [(m.sid, m.polls) for m in again] == [(_sid(7), 1), (_sid(8), 1)]
    assert store.poll_backlog(conn, at(5)) == (8, at(0))


def test_work_lists_read_their_partial_indexes(tmp_path: Path) -> None:
    """At scale a pass must not scan the table: each list is read through its index."""
    path = tmp_path / "s.db"
    _write(path, [callback("sent", at(0))])
    conn = store.connect(str(path), readonly=True)
    for query, index in ((_schedule._FIRST, "messages_first_poll"),
                         (_schedule._AGAIN, "messages_next_poll")):
        plan = " ".join(str(row[-1]) for row in conn.execute(
            f"EXPLAIN QUERY PLAN {query}", (at(1), "", 0, 10)))
        assert f"USING INDEX {index}" in plan, plan


# --- the upgrade from schema 1


@pytest.fixture
def v1_store(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    shutil.copy(DATA / "store-v1.db", path)
    return path


def test_verify_asks_for_the_upgrade_of_a_schema_1_store(v1_store: Path) -> None:
    result = store.verify(str(v1_store))
    assert not result.ok
    assert "schema version 1 is older" in result.reason
    assert "`msgledger run` upgrades it" in result.reason


def test_the_writer_upgrades_a_schema_1_store_in_place(v1_store: Path) -> None:
    """Opening upgrades it once; every message with a SID and no final status is due by its
    age; the replay of the journal gives exactly the upgraded projection."""
    writer = store.JournalWriter.open(str(v1_store))
    assert writer.upgraded_from == 1
    writer.close()
    conn = sqlite3.connect(v1_store)
    rows = dict(conn.execute("SELECT sid, poll_from FROM messages WHERE sid IS NOT NULL"))
    assert conn.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
    conn.close()
    assert rows == {_sid(1): "2026-11-01T02:00:00.000000+00:00", _sid(2): None,
                    _sid(4): "2026-11-04T01:00:00.000000+00:00", _sid(5): None,
                    _sid(6): "2026-11-06T01:00:00.000000+00:00"}
    assert store.verify(str(v1_store)).ok
    reopened = store.JournalWriter.open(str(v1_store))
    assert reopened.upgraded_from is None
    reopened.append([polled("sent", at(200), next_at=at(300), sid=_sid(1))])
    reopened.close()
    result = store.verify(str(v1_store))
    assert result.ok, result.reason


def test_the_offline_commands_ask_for_the_upgrade(v1_store: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`export` and `status` read only the current schema: on a schema-1 store they exit 1
    with one line saying what upgrades it, and leave the file as it was."""
    before = v1_store.read_bytes()
    monkeypatch.setenv("MSGLEDGER_STORE_PATH", str(v1_store))
    for command in ("export", "status"):
        assert cli.main([command]) == cli.EXIT_STORE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "`msgledger run` upgrades it" in err
    assert v1_store.read_bytes() == before
