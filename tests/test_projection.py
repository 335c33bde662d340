"""The fold (docs/design.md, "Status rules"): the status never goes backwards, in any order.

The pure rules are tested as properties over every status Twilio sends, msgledger's own local
statuses and statuses nobody has heard of; the same rules are then checked through a real
store, where every arrival order must give the same row and keep every event.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Sequence
from functools import reduce
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgledger import store
from msgledger.events import Event
from msgledger.store import MessageState, apply
from msgledger.store._fold import status_key
from msgledger.store._projector import fold

SID = "SM" + "a" * 32
TWILIO = ["accepted", "scheduled", "queued", "sending", "sent", "delivered", "undelivered",
          "failed", "canceled", "read"]
LOCAL = ["requested", "outcome_unknown", "rejected"]
UNKNOWN = ["partially_delivered", "weird"]
TERMINAL = {"delivered", "undelivered", "failed", "canceled"}
# The test's own statement of the order (lowest first), written from docs/design.md,
# "Status rules", plus the projection's documented tie-breaks: unknown < local <
# accepted/scheduled < queued < sending < sent < delivered/undelivered/failed/canceled <
# read; within a rank the order is fixed.
ORDER = [*sorted(UNKNOWN), "requested", "outcome_unknown", "rejected", "scheduled", "accepted",
         "queued", "sending", "sent", "canceled", "failed", "undelivered", "delivered", "read"]
ERROR_CODE = {status: f"3{i:04d}" for i, status in enumerate(ORDER)}  # one code per status
TIMES = [f"2024-05-01T12:00:{s:02d}.000000+00:00" for s in range(10)]


def event(status: str, at: str = TIMES[0], *, error: bool = False, sid: str = SID,
          ref: str | None = None) -> Event:
    """The event that carries `status`, shaped as its real producer shapes it: a send has
    our ref and no SID yet, a callback has the SID (and our ref when its URL carried it)."""
    code = ERROR_CODE[status] if error else ""
    if status in LOCAL:
        kind = {"requested": "send_requested", "outcome_unknown": "send_unknown",
                "rejected": "send_rejected"}[status]
        data = {"to": "+15005550006", "from": "+15005550001", "error_code": code or None}
        return Event(kind, "api", at, ref=ref or f"ref-{sid}", status=status, data=data)  # type: ignore[arg-type]
    params = [["MessageSid", sid], ["MessageStatus", status], ["To", "+15005550006"],
              ["From", "+15005550001"], ["ErrorCode", code]]
    return Event("callback", "callback", at, sid=sid, ref=ref, status=status,
                 data={"params": params})


def folded(events: Sequence[Event]) -> MessageState:
    state = fold(events)
    assert state is not None
    return state


@st.composite
def arrivals(draw: st.DrawFn, statuses: Sequence[str] = ORDER,
             max_size: int = 8) -> tuple[list[Event], list[Event]]:
    """A message's events (with at least one duplicate) and the same events in another order."""
    chosen = draw(st.lists(st.sampled_from(statuses), min_size=1, max_size=max_size - 1))
    chosen.append(draw(st.sampled_from(chosen)))  # a status Twilio sent twice
    events = [event(s, draw(st.sampled_from(TIMES)), error=draw(st.booleans())) for s in chosen]
    return events, draw(st.permutations(events))


# --- properties of the pure fold


@settings(max_examples=200, deadline=None)
@given(arrivals())
def test_status_is_the_highest_ranked_in_any_order(pair: tuple[list[Event], list[Event]]) -> None:
    """The status is the highest-ranked one seen, and the whole state ignores arrival order."""
    events, shuffled = pair
    statuses = [e.status for e in events]
    state = folded(events)
    assert state.status == max(statuses, key=ORDER.index)
    assert state.status == max(statuses, key=lambda s: status_key(str(s)))
    assert folded(shuffled) == state


@settings(max_examples=100, deadline=None)
@given(arrivals())
def test_status_conflict_iff_two_terminal_statuses(pair: tuple[list[Event], list[Event]]) -> None:
    """`status_conflict` is raised exactly when two different terminal statuses were seen."""
    events, shuffled = pair
    terminals = {e.status for e in events} & TERMINAL
    for order in (events, shuffled):
        assert ("status_conflict" in folded(order).flags) == (len(terminals) >= 2)


@settings(max_examples=100, deadline=None)
@given(arrivals())
def test_times_are_first_and_last_seen(pair: tuple[list[Event], list[Event]]) -> None:
    """created_at is the earliest event time, updated_at the latest, sent_at the earliest
    Twilio status (local and unknown statuses do not count as sent)."""
    events, shuffled = pair
    twilio_times = [e.at for e in events if e.status in TWILIO]
    for order in (events, shuffled):
        state = folded(order)
        assert state.created_at == min(e.at for e in events)
        assert state.updated_at == max(e.at for e in events)
        assert state.sent_at == (min(twilio_times) if twilio_times else None)


@settings(max_examples=100, deadline=None)
@given(arrivals())
def test_error_code_comes_with_the_winning_status(pair: tuple[list[Event], list[Event]]) -> None:
    """The error code is the one carried by an event of the winning status, never another's."""
    events, shuffled = pair
    winner = max((str(e.status) for e in events), key=ORDER.index)
    carried = any(e.status == winner and _code(e) for e in events)
    for order in (events, shuffled):
        assert folded(order).error_code == (ERROR_CODE[winner] if carried else None)


def _code(e: Event) -> str | None:
    if "params" in e.data:
        return dict(e.data["params"]).get("ErrorCode") or None
    return e.data.get("error_code")


@settings(max_examples=100, deadline=None)
@given(arrivals(statuses=[*LOCAL, *UNKNOWN]), st.sampled_from(TWILIO))
def test_any_twilio_status_beats_local_and_unknown(pair: tuple[list[Event], list[Event]],
                                                   twilio_status: str) -> None:
    """Local and unknown statuses lose to any Twilio status, whenever it arrives."""
    events, _ = pair
    for position in range(len(events) + 1):
        order = [*events[:position], event(twilio_status, TIMES[5]), *events[position:]]
        assert folded(order).status == twilio_status


# --- single cases, spelled out


def test_late_sent_after_delivered_leaves_delivered() -> None:
    """A `sent` callback that arrives after `delivered` does not move the status back."""
    state = folded([event("sent", TIMES[1]), event("delivered", TIMES[2]),
                    event("sent", TIMES[3])])
    assert state.status == "delivered"
    assert state.updated_at == TIMES[3]
    assert "status_conflict" not in state.flags


def test_unknown_status_never_beats_a_known_one() -> None:
    """`partially_delivered` and other unknown statuses never replace a known status."""
    for known in [*LOCAL, *TWILIO]:
        for unknown in UNKNOWN:
            assert folded([event(known), event(unknown)]).status == known
            assert folded([event(unknown), event(known)]).status == known


def test_unknown_status_is_kept_when_nothing_else_is_known() -> None:
    """An unknown status is accepted verbatim while it is the only status seen."""
    assert folded([event("partially_delivered")]).status == "partially_delivered"
    assert folded([Event("callback", "callback", TIMES[0], sid=SID, status="weird")]).status \
        == "weird"


def test_local_statuses_lose_to_accepted() -> None:
    """Even the lowest Twilio status (`accepted`) beats a send msgledger thought rejected."""
    state = folded([event("requested", TIMES[0]), event("rejected", TIMES[1], error=True),
                    event("accepted", TIMES[2])])
    assert state.status == "accepted"
    assert state.error_code is None


def test_read_beats_delivered_without_conflict() -> None:
    """`read` outranks `delivered` and is no terminal conflict."""
    state = folded([event("read", TIMES[2]), event("delivered", TIMES[1])])
    assert state.status == "read"
    assert "status_conflict" not in state.flags


def test_error_code_from_the_event_that_set_the_status() -> None:
    """The error code belongs to the winning status: a later lower status brings none in."""
    undelivered = folded([event("sent", TIMES[1]), event("undelivered", TIMES[2], error=True),
                          event("sent", TIMES[3], error=True)])
    assert (undelivered.status, undelivered.error_code) == ("undelivered",
                                                            ERROR_CODE["undelivered"])
    delivered = folded([event("undelivered", TIMES[1], error=True), event("delivered", TIMES[2])])
    assert (delivered.status, delivered.error_code) == ("delivered", None)
    assert "status_conflict" in delivered.flags


def test_blank_error_code_is_no_error_code() -> None:
    """Twilio's empty `ErrorCode=` parameter does not count as an error code."""
    assert folded([event("delivered", error=False)]).error_code is None


def test_error_code_of_equal_statuses_ignores_order() -> None:
    """Two `failed` callbacks with different error codes give the same state in either order."""
    def failed(code: str, at: str) -> Event:
        params = [["MessageSid", SID], ["MessageStatus", "failed"], ["ErrorCode", code]]
        return Event("callback", "callback", at, sid=SID, status="failed",
                     data={"params": params})
    one, two = failed("30003", TIMES[1]), failed("30005", TIMES[2])
    assert folded([one, two]) == folded([two, one])
    assert folded([one, two]).error_code in {"30003", "30005"}


def test_first_event_fixes_identity_and_parties() -> None:
    """sid, ref, to and from are taken from the first event that states them."""
    state = folded([event("requested", TIMES[0]), event("queued", TIMES[1])])
    assert (state.sid, state.ref) == (SID, f"ref-{SID}")
    assert (state.to, state.from_) == ("+15005550006", "+15005550001")


def test_flags_carried_by_events_are_kept() -> None:
    """Flags an event states in its data (`imported`, `unconfirmed`...) join the message's."""
    imported = Event("reconciled", "reconcile", TIMES[0], sid=SID, status="delivered",
                     data={"flags": ["imported"]})
    state = folded([imported, event("delivered", TIMES[1])])
    assert state.flags == frozenset({"imported"})


def test_event_without_status_changes_no_status() -> None:
    """A debugger alert about a message updates its times but not its status."""
    alert = Event("debugger", "debugger", TIMES[9], sid=SID, data={"params": [["Sid", "NO1"]]})
    state = apply(folded([event("sent", TIMES[1])]), alert)
    assert (state.status, state.updated_at) == ("sent", TIMES[9])
    assert fold([]) is None


# --- the same rules through a real store


def _message_rows(path: Path) -> list[tuple[str, str, int]]:
    """(sid, status, number of linked events) for every message in the store."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT m.sid, m.status, count(e.seq) FROM messages m"
            " LEFT JOIN message_events e ON e.message_id = m.id GROUP BY m.id").fetchall()
    finally:
        conn.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(ORDER), min_size=1, max_size=3).map(lambda s: [*s, s[0]]))
def test_store_gives_one_state_for_every_arrival_order(tmp_path_factory: pytest.TempPathFactory,
                                                       statuses: list[str]) -> None:
    """Every arrival order of a message's events, journaled for real, gives the same row, and
    the history keeps every event, duplicates included."""
    path = tmp_path_factory.mktemp("fold") / "ledger.db"
    orders = sorted(set(itertools.permutations(range(len(statuses)))))
    writer = store.JournalWriter.open(str(path))
    try:
        for n, order in enumerate(orders):
            sid = f"SM{n:032x}"
            writer.append([event(statuses[i], TIMES[i], sid=sid, ref=f"ref-{n}") for i in order])
    finally:
        writer.close()
    rows = _message_rows(path)
    expected = max(statuses, key=ORDER.index)
    assert len(rows) == len(orders)
    assert {(status, linked) for _, status, linked in rows} == {(expected, len(statuses))}
    assert store.verify(str(path)).ok


def test_fold_is_a_left_fold_of_apply() -> None:
    """`fold` is exactly `apply` applied event by event from nothing."""
    events = [event(s, TIMES[i]) for i, s in enumerate(["queued", "sent", "delivered"])]
    assert fold(events) == reduce(apply, events, None)  # type: ignore[arg-type]
