"""The overdue poller on virtual time (docs/design.md, "The overdue poller"): when it polls,
what it journals, how it rides out Twilio's refusals, and that its schedule lives in the
store. The rig (tests/poll_rig.py) runs the real journal, store, poller and simulator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import structlog
import trio
from twilio.rest import Client
from twilio.rest.api.v2010.account.message import MessageInstance

from msgledger import store
from msgledger.events import Event
from msgledger.metrics import Metrics
from msgledger.pacing import PROBE_EVERY, RUNNING, Window
from msgledger.twilio_api import FetchOutcome, Throttled, fetched

from .conftest import ACCOUNT_SID, AUTH_TOKEN
from .poll_rig import (
    CONFIG,
    DAY,
    HOUR,
    Rig,
    age_of,
    iso,
    open_rig,
    sim_fetch,
    start_poller,
    until,
    virtual_at,
    virtual_now,
)

pytestmark = pytest.mark.deadline(60 * DAY)  # virtual seconds: the schedule spans days
INTERVAL = CONFIG.interval
SLACK = INTERVAL + 60.0  # a poll comes at most one pass (plus its own time) after it is due


def fetches(rig: Rig) -> int:
    return rig.sim.stats.fetches


async def test_a_message_is_polled_after_overdue_after_and_not_before(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A message whose final callback was lost is fetched once it is 12 h old, not before,
    and its record takes Twilio's status from that poll."""
    async with open_rig(tmp_path / "s.db") as rig:
        sent_at = trio.current_time()
        sid = await rig.sent(status="delivered")
        await trio.sleep_until(sent_at + CONFIG.overdue_after - 1)
        assert fetches(rig) == 0
        assert rig.record(sid)["status"] == "queued"
        await until(lambda: rig.record(sid)["status"] == "delivered")
        (poll,) = rig.polls_of(sid)
    assert CONFIG.overdue_after <= age_of(poll, sent_at) <= CONFIG.overdue_after + SLACK
    assert poll["source"] == "poll" and poll["data"]["http_status"] == 200
    assert "next_poll_at" not in poll["data"]  # final: nothing more to ask
    assert {"status", "error_code", "error_message", "date_sent", "date_updated", "price",
            "price_unit", "num_segments"} <= set(poll["data"])
    assert fetches(rig) == 1


async def test_a_final_message_is_never_polled(tmp_path: Path,
                                               autojump_clock: trio.abc.Clock) -> None:
    """A message whose final callback arrived is not the poller's: days pass, no fetch."""
    async with open_rig(tmp_path / "s.db") as rig:
        sid = await rig.sent(status="delivered")
        await rig.journal(Event("callback", "callback", iso(virtual_now()), sid=sid,
                                status="delivered", data={"params": []}))
        no_sid = Event("send_unknown", "api", iso(virtual_now()), ref="lost",
                       status="outcome_unknown", data={})
        await rig.journal(no_sid)  # no SID: the reconciler's, never the poller's
        await trio.sleep(3 * DAY)
        assert fetches(rig) == 0


async def test_the_backoff_schedule_then_giving_up(tmp_path: Path,
                                                   autojump_clock: trio.abc.Clock) -> None:
    """A message that never becomes final is polled at 12 h, 24 h, 48 h, 96 h and 7 d of
    age, each poll setting the next; then it is flagged `unconfirmed` and polled no more.
    A final status arriving later still applies, and withdraws the flag."""
    async with open_rig(tmp_path / "s.db") as rig:
        sent_at = trio.current_time()
        sid = await rig.sent(status="sent")
        await until(lambda: "unconfirmed" in rig.record(sid)["flags"])
        await trio.sleep(3 * DAY)  # and then nothing more
        polls, record = rig.polls_of(sid), rig.record(sid)
        await rig.journal(Event("callback", "callback", iso(virtual_now()), sid=sid,
                                status="delivered", data={"params": []}))
        settled = rig.record(sid)
    ages = [age_of(p, sent_at) for p in polls]
    expected = [12 * HOUR, 24 * HOUR, 48 * HOUR, 96 * HOUR, 7 * DAY]
    assert len(ages) == len(expected)
    for age, due in zip(ages, expected, strict=True):
        assert due <= age <= due + SLACK
    nexts = [p["data"].get("next_poll_at") for p in polls]
    # the last poll sets its own time: due again at once should its give-up be lost
    assert nexts == [iso(virtual_at(sent_at + due)) for due in expected[1:]] + [polls[-1]["at"]]
    assert [h["kind"] for h in record["history"]][-2:] == ["polled", "poll_gave_up"]
    assert record["polls"] == 5 and record["status"] == "sent"
    assert fetches(rig) == 5
    assert "unconfirmed" not in settled["flags"] and settled["status"] == "delivered"


async def test_a_404_is_flagged_and_a_later_find_withdraws_it(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Twilio answers 404 for a SID it does not (yet) show: the record is flagged
    `not_found_at_twilio` and polled again on the schedule; the poll that finds it clears
    the flag and applies its status."""
    async with open_rig(tmp_path / "s.db") as rig:
        sid = "SM" + "c" * 32  # the simulator has never heard of it
        await rig.journal(Event("send_accepted", "api", iso(virtual_now()), sid=sid, ref="r",
                                status="queued", data={}))
        await until(lambda: "not_found_at_twilio" in rig.record(sid)["flags"])
        (first,) = rig.polls_of(sid)
        assert first["data"]["http_status"] == 404 and first["data"]["error_code"] == 20404
        assert rig.sim.stats.fetches_not_found == 1
        rig.sim.add_message(to="+15558675310", status="undelivered", error_code=30003, sid=sid)
        await until(lambda: rig.record(sid)["status"] == "undelivered")
        record = rig.record(sid)
    assert "not_found_at_twilio" not in record["flags"]
    assert record["error_code"] == "30003" and record["polls"] == 2


async def test_a_storm_of_429s_is_ridden_out_with_less_concurrency(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Ten minutes of 429s: the poller halves its window down to one fetch in flight, backs
    off, and once Twilio answers again polls every message, raising the window again."""
    config = dataclasses.replace(CONFIG, concurrency=8)
    async with open_rig(tmp_path / "s.db", config=config, start=False,
                        latency=0.05) as rig:
        sids = [await rig.sent(status="delivered") for _ in range(60)]
        await trio.sleep(CONFIG.overdue_after)  # every one overdue at once
        storm_ends = trio.current_time() + 600
        rig.sim.throttle(until=storm_ends)
        async with trio.open_nursery() as nursery:
            await start_poller(nursery, rig, config)
            await trio.sleep(120)
            window_in_storm = rig.metrics.poller.concurrency._value.get()
            rig.sim.stats.peak_in_flight = 0
            await trio.sleep_until(storm_ends - 1)
            peak_in_storm = rig.sim.stats.peak_in_flight
            await until(lambda: all(rig.record(s)["status"] == "delivered" for s in sids))
            window_after = rig.metrics.poller.concurrency._value.get()
            rig.stop.set()
    assert window_in_storm == 1
    assert peak_in_storm <= 2  # one in flight, and one issued before the last cut
    assert rig.sim.stats.requests_429 > 0
    assert window_after > 1
    assert all(len(rig.polls_of(s)) == 1 for s in sids)  # a 429 is never journaled


async def test_refused_credentials_pause_the_poller_until_a_retry_succeeds(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """401: the poller pauses (reported, and in a metric), probes once a minute rather than
    hammering Twilio, and resumes when the credentials work again."""
    async with open_rig(tmp_path / "s.db") as rig:
        sids = [await rig.sent(status="delivered") for _ in range(10)]
        knobs = rig.sim.knobs
        rig.sim.knobs = dataclasses.replace(knobs, auth_token="rotated-" + "0" * 24)
        await trio.sleep(CONFIG.overdue_after + INTERVAL)
        paused = rig.states[-1]
        paused_gauge = rig.metrics.poller.paused._value.get()
        requests_before = rig.sim.stats.requests
        await trio.sleep(10 * PROBE_EVERY)
        probes = rig.sim.stats.requests - requests_before
        rig.sim.knobs = knobs
        await until(lambda: all(rig.record(s)["status"] == "delivered" for s in sids))
    assert paused.startswith("paused: Twilio refuses the credentials (HTTP 401")
    assert paused_gauge == 1
    assert 9 <= probes <= 11  # one a minute
    assert rig.states == [RUNNING, paused, RUNNING]  # reported, once each
    assert rig.metrics.poller.paused._value.get() == 0


async def test_a_restart_resumes_the_schedule_from_the_store(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Stopped after the first poll and started again hours later, the poller asks at the
    next age of the schedule (24 h), not again at once; verify's replay agrees with it."""
    path = tmp_path / "s.db"
    async with open_rig(path) as rig:
        sent_at = trio.current_time()
        sid = await rig.sent(status="sent")
        await until(lambda: len(rig.polls_of(sid)) == 1)
        sim = rig.sim
    await trio.sleep_until(sent_at + 20 * HOUR)  # the daemon is down meanwhile
    async with open_rig(path, sim=sim) as rig:
        await trio.sleep(INTERVAL)
        assert sim.stats.fetches == 1  # the restart's first pass found nothing due
        await until(lambda: len(rig.polls_of(sid)) == 2)
        second = rig.polls_of(sid)[1]
    assert 24 * HOUR <= age_of(second, sent_at) <= 24 * HOUR + SLACK
    assert store.verify(str(path)).ok


async def test_one_burst_of_overload_halves_the_window_once(
        autojump_clock: trio.abc.Clock) -> None:
    """Eight fetches refused together cut the window once (8 to 4), as one round trip's
    congestion; a fetch issued after the cut cuts again; a window of successes adds one."""
    window = Window(8, Metrics().poller)
    issued: list[float] = []

    async def fetch() -> None:
        async with window.slot() as at:
            issued.append(at)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(fetch)
    for at in issued:
        window.overloaded(at)
    assert window.size == 4
    async with window.slot() as at:
        pass
    window.overloaded(at)
    assert window.size == 2
    window.succeeded()
    assert window.size == 2
    window.succeeded()
    assert window.size == 3


async def test_an_unreadable_store_fails_the_pass_not_the_poller(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A store the poller cannot read (here: its reads go to a file that is not there)
    fails each pass with one `poll_pass_failed` line; the poller lives on."""
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        with structlog.testing.capture_logs() as logged:
            async with trio.open_nursery() as nursery:
                await start_poller(nursery, rig, reads_from=tmp_path / "gone.db")
                await trio.sleep(3 * INTERVAL)
                rig.stop.set()
    failed = [line for line in logged if line["event"] == "poll_pass_failed"]
    assert len(failed) >= 3 and "unable to open" in failed[0]["error"]
    assert any(line["event"] == "backlog_unreadable" for line in logged)
    assert rig.states == [RUNNING]


async def test_answers_the_client_cannot_read_are_journaled_not_retried(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A Twilio answer of the wrong shape (a status that is a list) is journaled as an
    answer with its error, and its schedule moves on; the other messages are polled as
    ever, and the poller lives on."""
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        odd = await rig.sent(status="delivered")
        fine = await rig.sent(status="delivered")
        version = Client(ACCOUNT_SID, AUTH_TOKEN).api.v2010
        simulated = sim_fetch(rig.sim)

        async def twilio(sid: str) -> FetchOutcome:
            if sid == odd:
                return fetched(MessageInstance(version, {"sid": sid, "status": ["x"]},
                                               ACCOUNT_SID))
            return await simulated(sid)

        rig.fetch = twilio
        async with trio.open_nursery() as nursery:
            await start_poller(nursery, rig)
            await until(lambda: bool(rig.polls_of(odd)) and bool(rig.polls_of(fine)))
            rig.stop.set()
    (poll,) = rig.polls_of(odd)
    assert poll["data"]["error_message"].startswith("unreadable answer: status ['x']")
    assert "status" not in poll and poll["data"]["next_poll_at"]
    assert rig.record(fine)["status"] == "delivered"


async def test_a_message_refused_pass_after_pass_moves_on(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A message Twilio answers 503 for every time, while it answers the account: after
    three passes its refusal is journaled as its answer and its schedule moves on, instead
    of its being retried for ever."""
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        stuck = await rig.sent(status="delivered")
        simulated = sim_fetch(rig.sim)

        async def twilio(sid: str) -> FetchOutcome:
            if sid == stuck:
                return Throttled("server error (HTTP 503): busy", 503)
            return await simulated(sid)

        rig.fetch = twilio
        async with trio.open_nursery() as nursery:
            await start_poller(nursery, rig)
            await until(lambda: bool(rig.polls_of(stuck)))
            polled_at = trio.current_time()
            rig.stop.set()
    (poll,) = rig.polls_of(stuck)
    assert poll["data"]["http_status"] == 503
    assert poll["data"]["error_message"].startswith("refused 3 passes in a row")
    assert CONFIG.overdue_after + 2 * INTERVAL <= polled_at
    assert poll["data"]["next_poll_at"] == iso(virtual_at(24 * HOUR))


async def test_a_give_up_whose_flag_was_lost_is_given_up_again(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """The last poll and its `poll_gave_up` are two events: should only the poll be
    journaled (a shutdown between them), the message is due again at once, and the next
    pass gives up on it, instead of leaving it neither polled nor flagged."""
    async with open_rig(tmp_path / "s.db", start=False) as rig:
        sid = await rig.sent(status="sent")
        await trio.sleep(CONFIG.give_up_after + HOUR)
        now = iso(virtual_now())
        await rig.journal(Event("polled", "poll", now, sid=sid, status="sent", data={
            "http_status": 200, "status": "sent", "next_poll_at": now}))
        async with trio.open_nursery() as nursery:
            await start_poller(nursery, rig)
            await until(lambda: "unconfirmed" in rig.record(sid)["flags"])
            rig.stop.set()
    record = rig.record(sid)
    assert [h["kind"] for h in record["history"]][-3:] == ["polled", "polled", "poll_gave_up"]
    assert record["next_poll_at"] is None  # the poller is done with it
