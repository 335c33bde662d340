"""The reconciler's list path on virtual time: each outcome of the comparison, paging with
a 429 in the middle, Twilio lost mid-run, idempotent second runs, interrupted runs, the
daily schedule, and a replay that still matches (docs/design.md, "The daily reconciler")."""

from __future__ import annotations

import datetime as dt
import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from msgledger import store
from msgledger.twilio_api import Page

from .poll_rig import Rig, open_rig
from .reconcile_rig import (
    CONFIG,
    DAY,
    NOON,
    lost_send,
    reconcile,
    reconciler_for,
    registered,
    running,
    sim_list_page,
)

TO = "+15558675310"
MINUTE = dt.timedelta(minutes=1)


def journal_count(rig: Rig) -> int:
    conn = store.connect(str(rig.path), readonly=True)
    try:
        return int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])
    finally:
        conn.close()


def records(rig: Rig) -> dict[str, store.Record]:
    """Every record, by SID or (for a message without one) by ref."""
    conn = store.connect(str(rig.path), readonly=True)
    try:
        return {r["sid"] or r["ref"]: r for r in store.iter_records(conn)}
    finally:
        conn.close()


def listed_through_the_day(rig: Rig, count: int) -> None:
    """`count` delivered messages at Twilio, a second apart from noon of DAY."""
    for i in range(count):
        rig.sim.add_message(to=TO, status="delivered", date_created=NOON,
                            date_sent=NOON + dt.timedelta(seconds=i))


def verified(rig: Rig) -> bool:
    return store.verify(str(rig.path)).ok


async def test_a_newer_status_is_journaled_and_a_second_run_adds_only_its_record(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        newer = rig.sim.add_message(to=TO, status="delivered", date_created=NOON,
                                    date_sent=NOON)
        same = rig.sim.add_message(to=TO, status="sent", date_created=NOON, date_sent=NOON)
        await rig.journal(registered(newer.sid, NOON), registered(same.sid, NOON))
        async with running(rig) as reconciler:
            first = await reconcile(reconciler)
            assert first.status == "done", first.reason
            assert first.tally["updated"] == 1 and first.tally["unchanged"] == 1
            record = rig.record(newer.sid)
            assert record["status"] == "delivered" and record["final"]
            assert [h["source"] for h in record["history"]] == ["register", "reconcile"]
            assert rig.record(same.sid)["status"] == "sent"
            before = journal_count(rig)
            second = await reconcile(reconciler)
            assert second.status == "done" and second.tally["updated"] == 0
            # Its own `reconcile_started` and `reconcile_run`, nothing else.
            assert journal_count(rig) == before + 2
            assert verified(rig)


async def test_a_different_terminal_status_is_a_conflict(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        message = rig.sim.add_message(to=TO, status="failed", date_created=NOON,
                                      date_sent=NOON, error_code=30008)
        await rig.journal(registered(message.sid, NOON, status="delivered"))
        async with running(rig) as reconciler:
            assert (await reconcile(reconciler)).tally["updated"] == 1
            record = rig.record(message.sid)
            assert record["status"] == "delivered" and "status_conflict" in record["flags"]
            assert (await reconcile(reconciler)).tally["updated"] == 0  # seen now: no news


async def test_a_lost_send_gets_its_sid_even_with_the_number_redacted(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """The create's answer was lost; Twilio lists the message with `To` ending in XXXX."""
    body = "Your code is 1234"
    sha = hashlib.sha256(body.encode()).hexdigest()
    async with open_rig(tmp_path / "s.db", start=False, redact_to=True) as rig:
        listed = rig.sim.add_message(to=TO, from_="+15005550001", body=body, status="delivered",
                                     date_created=NOON + MINUTE, date_sent=NOON + MINUTE)
        await rig.journal(*lost_send("ref-lost", NOON, body_sha256=sha))
        # Another number's lost send, and one of the right number long before: no match.
        await rig.journal(*lost_send("ref-other", NOON, to="+15551112222"))
        await rig.journal(*lost_send("ref-early", NOON - dt.timedelta(hours=2)))
        async with running(rig) as reconciler:
            run = await reconcile(reconciler)
            assert run.status == "done" and run.tally["sid_matched"] == 1
            record = rig.record(listed.sid)
            assert (record["ref"], record["status"], record["to"]) == ("ref-lost", "delivered", TO)
            assert record["flags"] == []
            found = records(rig)
            assert "not_created" in found["ref-other"]["flags"]  # the day is closed: never created
            assert "not_created" in found["ref-early"]["flags"]
            assert await_nothing_new(rig, await reconcile(reconciler))
            assert verified(rig)


def await_nothing_new(rig: Rig, run: Any) -> bool:
    interesting = {k: v for k, v in run.tally.items() if k not in ("listed", "unchanged",
                                                                   "fetched_unlisted")}
    return run.status == "done" and not interesting


async def test_two_candidates_are_flagged_and_given_nothing(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        listed = rig.sim.add_message(to=TO, from_="+15005550001", status="delivered",
                                     date_created=NOON, date_sent=NOON)
        await rig.journal(*lost_send("ref-a", NOON - MINUTE), *lost_send("ref-b", NOON + MINUTE))
        async with running(rig) as reconciler:
            run = await reconcile(reconciler)
            assert run.tally["ambiguous_match"] == 1 and run.tally["imported"] == 1
            found = records(rig)
            assert set(found[listed.sid]["flags"]) == {"imported", "ambiguous_match"}
            assert found[listed.sid]["ref"] is None
            for ref in ("ref-a", "ref-b"):
                assert found[ref]["flags"] == ["ambiguous_match"] and found[ref]["sid"] is None
            assert await_nothing_new(rig, await reconcile(reconciler))


async def test_a_message_sent_outside_msgledger_is_imported(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        listed = rig.sim.add_message(to=TO, body="hi", status="undelivered", error_code=30003,
                                     date_created=NOON, date_sent=NOON)
        # Not of the day: listed only for another day.
        rig.sim.add_message(to=TO, date_created=NOON + dt.timedelta(days=1),
                            date_sent=NOON + dt.timedelta(days=1))
        async with running(rig, keep_body="hash") as reconciler:
            run = await reconcile(reconciler)
            assert (run.tally["imported"], run.tally["listed"]) == (1, 1)
            record = rig.record(listed.sid)
            assert (record["status"], record["error_code"], record["flags"]) == (
                "undelivered", "30003", ["imported"])
            assert record["body"] is None  # store.keep_body = hash
            assert record["body_sha256"] == hashlib.sha256(b"hi").hexdigest()


async def test_unlisted_messages_are_fetched_before_being_called_missing(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        gone = "SM" + "d" * 32  # the simulator never had it: 404
        late = rig.sim.add_message(to=TO, status="delivered", date_created=NOON,
                                   date_sent=NOON + dt.timedelta(days=1))  # listed elsewhere
        await rig.journal(registered(gone, NOON), registered(late.sid, NOON))
        async with running(rig) as reconciler:
            run = await reconcile(reconciler)
            assert run.tally["fetched_unlisted"] == 2 and run.tally["missing_at_twilio"] == 1
            assert rig.record(gone)["flags"] == ["missing_at_twilio"]
            assert rig.record(late.sid)["status"] == "delivered"  # the fetch's news is kept
            assert await_nothing_new(rig, await reconcile(reconciler))
            rig.sim.add_message(to=TO, status="sent", sid=gone, date_created=NOON, date_sent=NOON)
            again = await reconcile(reconciler)
            assert again.tally["found_again"] == 1
            assert rig.record(gone)["flags"] == []


async def test_a_day_still_open_flags_no_lost_send(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Today, so far: a send of unknown outcome may still be listed later."""
    async with open_rig(tmp_path / "s.db", start=False) as rig, running(rig) as reconciler:
        today = reconciler.clock()
        await rig.journal(*lost_send("ref-today", today))
        run = await reconcile(reconciler, today.date())
        assert run.status == "done" and run.tally["not_created"] == 0
        assert records(rig)["ref-today"]["flags"] == []


async def test_pages_are_followed_through_a_429(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        listed_through_the_day(rig, 2300)
        pages = sim_list_page(rig.sim)

        async def throttled_after_the_first(uri: str | None, params: dict[str, str]) -> Any:
            if uri is not None and rig.sim.stats.requests_429 == 0:
                rig.sim.throttle(requests=3)  # the second page is refused three times
            return await pages(uri, params)

        async with running(rig, list_page=throttled_after_the_first) as reconciler:
            run = await reconcile(reconciler)
            assert run.status == "done" and run.pages == 3
            assert rig.sim.stats.requests_429 == 3
            assert run.tally["imported"] == 2300


async def test_twilio_lost_mid_run_leaves_the_run_incomplete(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        listed_through_the_day(rig, 1500)
        await rig.journal(*lost_send("ref-lost", NOON))
        pages = sim_list_page(rig.sim)

        async def gone_after_the_first(uri: str | None, params: dict[str, str]) -> Any:
            if uri is not None:
                rig.sim.throttle(until=trio.current_time() + 10 * 86400)
            return await pages(uri, params)

        async with running(rig, list_page=gone_after_the_first) as reconciler:
            run = await reconcile(reconciler)
            assert run.status == "incomplete" and run.pages == 1
            assert run.last_page == "first" and "after 8 tries" in str(run.reason)
            assert run.tally["imported"] == 1000  # the first page was compared
            assert records(rig)["ref-lost"]["flags"] == []  # an incomplete listing proves nothing


async def test_broken_rows_are_counted_and_quoted(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        good = rig.sim.add_message(to=TO, status="delivered", date_created=NOON,
                                   date_sent=NOON)

        async def odd_page(uri: str | None, params: dict[str, str]) -> Page:
            page = await sim_list_page(rig.sim)(uri, params)
            assert isinstance(page, Page)
            return Page([*page.messages, "not an object", {"sid": 42},
                         {"sid": "SM" + "e" * 32, "status": ["x"], "date_sent": "yesterday",
                          "date_created": "Tue, 20 Oct 2026 12:00:00 +0000"}], None)

        async with running(rig, list_page=odd_page) as reconciler:
            run = await reconcile(reconciler)
            assert run.status == "done"
            assert run.tally["broken"] == 2 and [b["why"] for b in run.broken] == [
                "not an object but str", "no message SID"]
            assert run.tally["read_in_part"] == 1 and run.tally["imported"] == 2
            odd = rig.record("SM" + "e" * 32)
            assert odd["status"] is None and odd["flags"] == ["imported"]
            assert odd["history"][0]["data"]["problems"] == ["status", "date_sent"]
            assert rig.record(good.sid)["status"] == "delivered"


async def test_an_interrupted_run_is_recorded_incomplete(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    path = tmp_path / "s.db"
    async with open_rig(path, start=False) as rig:
        rig.sim.add_message(to=TO, status="delivered", date_created=NOON, date_sent=NOON)

        async def never(uri: str | None, params: dict[str, str]) -> Page:
            await trio.sleep_forever()
            raise AssertionError

        reconciler, stop = reconciler_for(rig, list_page=never), trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(reconciler.serve, stop))
            run = await reconciler.request(DAY, "list")
            await trio.sleep(10)
            stop.set()  # a drain: the run under way is recorded as it stands
        assert run.recorded.is_set()
        assert run.status == "incomplete" and "stopped" in str(run.reason)
    conn = store.connect(str(path), readonly=True)
    try:
        kinds = [e.kind for e in store._reconcile.run_events(conn)]
    finally:
        conn.close()
    assert kinds == ["reconcile_run", "reconcile_started"]


@pytest.mark.deadline(3 * 86400)  # virtual: a day and a half of the schedule
async def test_the_daily_run_covers_the_lookback_days(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig, running(rig) as reconciler:
        assert reconciler.runs() == []
        await trio.sleep(3.5 * 3600 - 60)  # the clock starts at midnight: not yet 03:30
        assert reconciler.runs() == []
        await trio.sleep(120)
        today = reconciler.clock().date()
        runs = reconciler.runs()
        assert sorted(r.day for r in runs) == [today - dt.timedelta(days=2),
                                               today - dt.timedelta(days=1)]
        assert {r.trigger for r in runs} == {"daily"}
        for run in runs:
            await run.recorded.wait()
            assert run.status == "done"
        await trio.sleep(86400)
        assert len(reconciler.runs()) == 4  # and the next day again


async def test_the_same_day_asked_twice_while_queued_is_one_run(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig, \
            running(rig, config=CONFIG) as reconciler:
        first = await reconciler.request(DAY, "list")
        assert await reconciler.request(DAY, "list") is first
        await first.recorded.wait()
        assert (await reconciler.request(DAY, "list")) is not first


async def test_a_sid_listed_twice_in_a_page_is_matched_once(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        listed = rig.sim.add_message(to=TO, from_="+15005550001", status="delivered",
                                     date_created=NOON, date_sent=NOON)
        await rig.journal(*lost_send("ref-lost", NOON))

        async def twice(uri: str | None, params: dict[str, str]) -> Page:
            page = await sim_list_page(rig.sim)(uri, params)
            assert isinstance(page, Page)
            return Page(page.messages * 2, None)

        async with running(rig, list_page=twice) as reconciler:
            run = await reconcile(reconciler)
        assert (run.tally["sid_matched"], run.tally["listed_twice"]) == (1, 1)
        record = rig.record(listed.sid)
        assert (record["ref"], record["flags"]) == ("ref-lost", [])


async def test_ambiguity_does_not_depend_on_the_listing_s_order(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Two lost sends, two listed messages either could be: all four are ambiguous."""
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        x, y = (rig.sim.add_message(to=TO, from_="+15005550001", status="delivered",
                                    date_created=NOON + n * MINUTE, date_sent=NOON + n * MINUTE)
                for n in (0, 1))
        await rig.journal(*lost_send("ref-a", NOON), *lost_send("ref-b", NOON + MINUTE))
        async with running(rig) as reconciler:
            run = await reconcile(reconciler)
        found = records(rig)
        assert run.tally["ambiguous_match"] == 2 and run.tally["sid_matched"] == 0
        for sid in (x.sid, y.sid):
            assert set(found[sid]["flags"]) == {"imported", "ambiguous_match"}
        for ref in ("ref-a", "ref-b"):
            assert found[ref]["flags"] == ["ambiguous_match"]


async def test_an_import_counts_for_the_day_twilio_sent_it(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        listed = rig.sim.add_message(to=TO, status="sent", date_created=NOON - MINUTE,
                                     date_sent=NOON)
        async with running(rig) as reconciler:
            await reconcile(reconciler)
            record = rig.record(listed.sid)
            today = await reconcile(reconciler, reconciler.clock().date())
            again = await reconcile(reconciler)
    assert (record["created_at"], record["sent_at"]) == (
        (NOON - MINUTE).isoformat(timespec="microseconds"),
        NOON.isoformat(timespec="microseconds"))
    assert today.tally["fetched_unlisted"] == 0  # not filed under the day of the run
    assert (again.tally["fetched_unlisted"], again.tally["unchanged"]) == (0, 1)


async def test_a_run_that_meets_the_unforeseen_fails_and_the_next_one_runs(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    async def bug_once(uri: str | None, params: dict[str, str]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a rule nobody wrote")
        return await pages(uri, params)

    async with open_rig(tmp_path / "s.db", start=False) as rig:
        pages = sim_list_page(rig.sim)
        async with running(rig, list_page=bug_once) as reconciler:
            failed = await reconcile(reconciler)
            done = await reconcile(reconciler)
    assert failed.status == "failed" and "a rule nobody wrote" in str(failed.reason)
    assert done.status == "done"


async def test_a_send_twilio_held_for_days_is_still_matched(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Created (and lost) three days before Twilio sent it: a scheduled message, say."""
    created = NOON - dt.timedelta(days=3)
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        listed = rig.sim.add_message(to=TO, from_="+15005550001", status="delivered",
                                     date_created=created, date_sent=NOON)
        await rig.journal(*lost_send("ref-held", created))
        async with running(rig) as reconciler:
            run = await reconcile(reconciler)
        assert run.tally["sid_matched"] == 1
        assert rig.record(listed.sid)["ref"] == "ref-held"
