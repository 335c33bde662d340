"""The overdue poller: fetch by SID every message whose final status has not come, because
its callback may be lost (docs/design.md, "The overdue poller").

Every `poller.interval` a pass runs: a scheduler reads the due messages from the store's
two work lists (`store/_schedule.py`) in pages and sends them into a bounded channel;
`poller.concurrency` workers take them, fetch each through the `Pacer` (Twilio's limits,
`pacing.py`) and hand the answer to the journal as a `polled` event through the same
journal client as every other producer, fetching the next while it commits; a collector
waits for the commits, counts them, and journals `poll_gave_up` after a last poll. Each
`polled` event carries the next poll time the schedule sets, and the fold keeps it in the
record: nothing of the schedule lives in memory, so a restart resumes where the poller
stopped, and `verify`'s replay reproduces it.

The schedule: first at `overdue_after` of age (from `sent_at`, or the first event), then at
twice that age, four times..., and at `give_up_after` a last time; a message still not final
then gets `poll_gave_up` and the flag `unconfirmed`, and is polled no more. A throttled fetch
is not journaled: the message stays due and the next pass takes it again (after three
passes, while Twilio answers the account, its refusal is journaled as its answer).

Ends when `stop` is set, abandoning the pass in progress (a cut-off poll is simply due again
at the next start), and closes its journal client.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import store
from .drain import cancel_when
from .events import Ack, Event, JournalUnavailable, Reply, iso_utc
from .journal_client import JournalClient
from .logs import get_logger
from .metrics import PollerMetrics
from .pacing import Fetch, Pacer, Probe, Report
from .settings import Settings
from .store_reads import StoreReads, StoreUnreadable
from .twilio_api import Fetched, Throttled

log = get_logger("msgledger.poller")

PAGE = 500  # due messages read per query: a few ms of SQLite, minutes of fetching at most
DEFER_PASSES = 3  # passes in a row a message may stay throttled while Twilio answers others
Clock = Callable[[], dt.datetime]  # the wall clock the schedule reads (UTC)


def wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class PollerConfig:
    overdue_after: float  # seconds of age before the first poll
    give_up_after: float  # seconds of age after which a message is given up on
    interval: float  # seconds between passes
    concurrency: int  # fetches in flight at most
    backlog_every: float = 30.0  # seconds between refreshes of the overdue gauges

    @classmethod
    def from_settings(cls, settings: Settings) -> PollerConfig:
        return cls(settings.poller_overdue_after, settings.poller_give_up_after,
                   settings.poller_interval, settings.poller_concurrency)


def next_poll(config: PollerConfig, poll_from: dt.datetime,
              now: dt.datetime) -> dt.datetime | None:
    """After a poll at `now` that found the message not final: when to poll again (the first
    age of the doubling schedule past the current one, at most `give_up_after`), or None to
    give up. A late poll (the daemon was down) skips the ages it missed."""
    age = (now - poll_from).total_seconds()
    if age >= config.give_up_after:
        return None
    step = config.overdue_after
    while step <= age:
        step *= 2
    return poll_from + dt.timedelta(seconds=min(step, config.give_up_after))


@dataclass
class PassTally:
    """What one pass did: its log line."""

    due: int = 0  # messages the pass found due
    polled: int = 0  # answers journaled
    changed: int = 0  # answers with another status than the record's
    flagged: int = 0  # 404s and give-ups
    deferred: int = 0  # still throttled after every try: due again next pass
    not_journaled: int = 0  # answered, but the journal could not keep it: due again
    failed: bool = False  # the store could not be read: the pass ended there
    started: float = field(default_factory=time.perf_counter)

    def fields(self) -> dict[str, Any]:
        return {"due": self.due, "polled": self.polled, "changed": self.changed,
                "flagged": self.flagged, "deferred": self.deferred,
                "not_journaled": self.not_journaled,
                "seconds": round(time.perf_counter() - self.started, 3)}


@dataclass(frozen=True, slots=True)
class _Answered:
    """A journaled answer waiting for its commit (`_Poller._collect`)."""

    due: store.DueMessage
    answer: Fetched
    reply: Reply
    at: dt.datetime
    give_up: bool  # the last poll: poll_gave_up follows once it is committed


@dataclass(frozen=True)
class PollerDeps:
    journal: JournalClient  # closed when the poller ends
    fetch: Fetch
    probe: Probe  # the credentials alone, while paused
    reads: StoreReads
    metrics: PollerMetrics
    report: Report  # "running" or "paused: ..." for /healthz (which says "draining" at the end)
    clock: Clock = wall_clock
    rng: random.Random = field(default_factory=random.Random)


async def run_poller(stop: trio.Event, *, config: PollerConfig, deps: PollerDeps,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a pass every `config.interval`, and keep the overdue gauges fresh, until `stop`
    is set."""
    with deps.journal:
        poller = _Poller(config, deps)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when, stop, nursery.cancel_scope)
            nursery.start_soon(poller.watch_backlog)
            task_status.started()
            while True:
                started = trio.current_time()
                await poller.run_pass()
                await trio.sleep_until(started + config.interval)


class _Poller:
    def __init__(self, config: PollerConfig, deps: PollerDeps) -> None:
        self._config = config
        self._deps = deps
        self._pacer = Pacer(deps.fetch, deps.probe, concurrency=config.concurrency,
                            metrics=deps.metrics, report=deps.report, rng=deps.rng)
        self._deferred: dict[str, int] = {}  # SID -> passes in a row it stayed throttled

    async def run_pass(self) -> PassTally:
        """Poll every message due now; log what the pass did. A store that cannot be read
        fails this pass only (`failed`): the next one tries again."""
        now, tally, size = self._deps.clock(), PassTally(), self._config.concurrency
        # A place per worker in each: the next page is read while the workers fetch, and a
        # worker fetches its next message while the journal commits its last answer.
        send, receive = trio.open_memory_channel[store.DueMessage](size)
        answered, collect = trio.open_memory_channel[_Answered](size)
        try:
            async with trio.open_nursery() as workers:
                workers.start_soon(self._collect, collect, tally)
                with answered:
                    for _ in range(size):
                        workers.start_soon(self._work, receive.clone(), answered.clone(), tally)
                receive.close()
                with send:
                    await self._dispatch(now, send, tally)
        except* StoreUnreadable as failed:
            log.error("poll_pass_failed", error=str(failed.exceptions[0]), **tally.fields())
            tally.failed = True
        if not tally.failed:
            log.info("poll_pass", **tally.fields())
        return tally

    async def watch_backlog(self) -> None:
        """Refresh the overdue gauges every `backlog_every`, passes or no passes (a paused
        poller is when they matter most)."""
        while True:
            try:
                await self._refresh_backlog(self._deps.clock())
            except StoreUnreadable as error:
                log.error("backlog_unreadable", error=str(error))
            await trio.sleep(self._config.backlog_every)

    async def _dispatch(self, now: dt.datetime, send: trio.MemorySendChannel[store.DueMessage],
                        tally: PassTally) -> None:
        """Send every due message, page by page: first the never polled, then the rest."""
        lists = ((store.first_polls, iso_utc(now - self._overdue_after)),
                 (store.repolls, iso_utc(now)))
        for read_list, bound in lists:
            after = store.NO_CURSOR
            while page := await self._deps.reads.run(read_list, bound, after, PAGE):
                tally.due += len(page)
                for due in page:
                    await send.send(due)
                after = page[-1].cursor

    async def _work(self, receive: trio.MemoryReceiveChannel[store.DueMessage],
                    answered: trio.MemorySendChannel[_Answered], tally: PassTally) -> None:
        with receive, answered:
            async for due in receive:
                await self._poll(due, answered, tally)

    async def _poll(self, due: store.DueMessage, answered: trio.MemorySendChannel[_Answered],
                    tally: PassTally) -> None:
        """Fetch `due` and hand its answer to the journal; `_collect` waits for the commit."""
        answer = await self._answer_or_defer(due, await self._pacer.fetch(due.sid), tally)
        if answer is None:
            return
        now = self._deps.clock()
        final = answer.status in store.FINAL
        again = None if final else next_poll(self._config, _parsed(due.poll_from), now)
        # The last poll sets its own time: should its poll_gave_up not be journaled, the
        # message is due again at once, and the next pass gives up again.
        polled = polled_event(due.sid, answer, now, None if final else again or now)
        reply = await self._deps.journal.enqueue(polled)
        await answered.send(_Answered(due, answer, reply, now, not final and again is None))

    async def _collect(self, answered: trio.MemoryReceiveChannel[_Answered],
                       tally: PassTally) -> None:
        """Wait for each answer's commit, in order; count it, and give up where due."""
        with answered:
            async for item in answered:
                if not self._acked(item.due, "polled", await item.reply.wait(), tally):
                    continue
                self._count(item.due, item.answer, tally)
                if item.give_up:
                    await self._give_up(item.due, item.at, tally)

    async def _answer_or_defer(self, due: store.DueMessage, answer: Fetched | Throttled,
                               tally: PassTally) -> Fetched | None:
        """The answer to journal, or None to leave the message for the next pass. A message
        throttled pass after pass while Twilio answers the account is refused for itself:
        its last refusal becomes its answer, so its schedule moves on."""
        if isinstance(answer, Fetched):
            self._deferred.pop(due.sid, None)
            return answer
        passes = self._deferred[due.sid] = self._deferred.get(due.sid, 0) + 1
        if passes < DEFER_PASSES or not await self._pacer.twilio_answers():
            tally.deferred += 1
            return None
        del self._deferred[due.sid]
        return Fetched(answer.http_status or 0, {}, None, f"refused {passes} passes in a row:"
                       f" {answer.reason}"[:300])

    def _acked(self, due: store.DueMessage, kind: str, ack: Ack, tally: PassTally) -> bool:
        if isinstance(ack, JournalUnavailable):
            log.warning("poll_not_journaled", sid=due.sid, kind=kind, error=str(ack))
            self._deps.metrics.polls.labels("not_journaled").inc()
            tally.not_journaled += 1
            return False
        return True

    async def _give_up(self, due: store.DueMessage, now: dt.datetime, tally: PassTally) -> None:
        event = Event("poll_gave_up", "poll", iso_utc(now), sid=due.sid, data={
            "polls": due.polls + 1, "poll_from": due.poll_from,
            "give_up_after": self._config.give_up_after})
        if self._acked(due, event.kind, await self._deps.journal.journal(event), tally):
            tally.flagged += 1
            self._deps.metrics.gave_up.inc()
            log.info("poll_gave_up", sid=due.sid, polls=due.polls + 1, status=due.status)

    def _count(self, due: store.DueMessage, answer: Fetched, tally: PassTally) -> None:
        tally.polled += 1
        outcome = ("not_found" if answer.http_status == 404
                   else "error" if answer.status is None
                   else "changed" if answer.status != due.status else "unchanged")
        self._deps.metrics.polls.labels(outcome).inc()
        tally.changed += outcome == "changed"
        tally.flagged += outcome == "not_found"

    async def _refresh_backlog(self, now: dt.datetime) -> None:
        count, oldest = await self._deps.reads.run(
            store.poll_backlog, iso_utc(now - self._overdue_after))
        self._deps.metrics.overdue.set(count)
        age = 0.0 if oldest is None else (now - _parsed(oldest)).total_seconds()
        self._deps.metrics.oldest_age.set(max(0.0, age))

    @property
    def _overdue_after(self) -> dt.timedelta:
        return dt.timedelta(seconds=self._config.overdue_after)


def polled_event(sid: str, answer: Fetched, now: dt.datetime,
                 again: dt.datetime | None) -> Event:
    """Twilio's answer as the journal keeps it: its fields verbatim (or its error), and the
    next poll time the schedule set (none once the status is final)."""
    data: dict[str, Any] = {"http_status": answer.http_status, **answer.resource}
    if answer.status is None:
        data.update(error_code=answer.error_code, error_message=answer.error_message)
    if again is not None:
        data["next_poll_at"] = iso_utc(again)
    return Event("polled", "poll", iso_utc(now), sid=sid, status=answer.status, data=data)


def _parsed(moment: str) -> dt.datetime:
    """A time as the journal wrote it (ISO 8601, UTC) back into a datetime."""
    return dt.datetime.fromisoformat(moment)
