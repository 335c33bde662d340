"""The journal never dies of one event: whatever text an event carries, in any field, the
actor answers every submission, commits the events it can, and carries on."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgledger import store
from msgledger.deadlines import AckDeadlines
from msgledger.events import Event, JournalUnavailable, Submission, utc_now
from msgledger.journal import run_journal
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics

# Any text at all, lone surrogates included: what a JSON body's "\ud83d" decodes to.
TEXT = st.text(st.one_of(st.characters(), st.characters(categories=("Cs",))), max_size=12)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
EVENTS = st.builds(Event, kind=TEXT, source=TEXT, at=TEXT, sid=st.none() | TEXT,
                   ref=st.none() | TEXT, status=st.none() | TEXT,
                   data=st.dictionaries(TEXT, JSON_VALUE, max_size=4))


def good_event(n: int) -> Event:
    return Event("callback", "callback", utc_now(), sid=f"SM{n:032x}", status="sent",
                 data={"params": [["MessageSid", f"SM{n:032x}"]]})


def encodable(event: Event) -> bool:
    """Whether every text of `event` is valid Unicode, so SQLite can store it."""
    fields = [event.kind, event.source, event.at, event.sid, event.ref, event.status]
    try:
        json.dumps([fields, event.data], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def journal_all(path: Path, events: list[Event]) -> list[Any]:
    """Hand every event to a real journal actor at once (so they share batches) and
    collect each answer; then one more good event, to show the actor still commits."""
    writer = store.JournalWriter.open(str(path))
    intake, inbox = trio.open_memory_channel[Submission](len(events) + 1)
    answers: list[Any] = [None] * len(events)
    deadlines = AckDeadlines(60)
    journal = JournalClient(intake, deadlines)

    async def one(i: int, event: Event) -> None:
        answers[i] = await journal.journal(event)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deadlines.run)
            await nursery.start(lambda task_status: run_journal(
                inbox, writer=writer, metrics=Metrics(), task_status=task_status))
            with journal:
                async with trio.open_nursery() as producers:
                    for i, event in enumerate(events):
                        producers.start_soon(one, i, event)
                answers.append(await journal.journal(good_event(len(events))))
            nursery.cancel_scope.cancel()  # the journal has answered everyone
    finally:
        writer.close()
    return answers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(EVENTS, st.integers(0, 10**6).map(good_event)), min_size=1,
                max_size=12))
async def test_every_event_is_answered_and_the_journal_lives_on(events: list[Event]) -> None:
    """Every submission gets an answer: a sequence number for an event that can be stored,
    JournalUnavailable for one that cannot. The actor outlives them all, and what it
    committed verifies."""
    with trio.fail_after(30), tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "ledger.db"
        answers = await journal_all(path, events)
        for event, answer in zip(events, answers, strict=False):
            if encodable(event):
                assert isinstance(answer, int), (event, answer)
            else:
                assert isinstance(answer, JournalUnavailable), (event, answer)
        assert isinstance(answers[-1], int)  # the actor is alive and committing
        result = store.verify(str(path))
        assert result.ok and result.events == sum(isinstance(a, int) for a in answers), result


async def test_a_lone_surrogate_fails_alone() -> None:
    """The regression itself: a lone surrogate (a JavaScript client cutting an emoji in
    half) among good events costs only its own event."""
    bad = Event("register", "register", utc_now(), sid="SM" + "a" * 32, status="sent",
                data={"to": "+1555\ud83d"})
    with trio.fail_after(10), tempfile.TemporaryDirectory() as scratch:
        answers = await journal_all(Path(scratch) / "l.db", [good_event(1), bad, good_event(2)])
    assert [type(a) for a in answers] == [int, JournalUnavailable, int, int]
    assert "cannot be stored" in str(answers[1])
