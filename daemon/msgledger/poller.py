"""The overdue poller: fetch by SID every message whose final status has not come, because
its callback may be lost (docs/design.md, "The overdue poller").

Every `poller.interval` a pass runs: a scheduler reads the due messages from the store's
two work lists (`store/_schedule.py`) in pages and sends them into a bounded channel;
`poller.concurrency` workers take them, fetch each through the `Pacer` (Twilio's limits,
`pacing.py`) and journal the answer as a `polled` event through the same journal client as
every other producer. That event carries the next poll time the schedule sets, and the fold
keeps it in the record: nothing of the schedule lives in memory, so a restart resumes where
the poller stopped, and `verify`'s replay reproduces it.

The schedule: first at `overdue_after` of age (from `sent_at`, or the first event), then at
twice that age, four times..., and at `give_up_after` a last time; a message still not final
then gets `poll_gave_up` and the flag `unconfirmed`, and is polled no more. A throttled fetch
is not journaled: the message stays due and the next pass takes it again.

Ends when `stop` is set, abandoning the pass in progress (a cut-off poll is simply due again
at the next start), and closes its journal client.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from . import store
from .events import Event, JournalUnavailable
from .journal_client import JournalClient
from .logs import get_logger
from .metrics import PollerMetrics
from .pacing import Fetch, Pacer, Report
from .settings import Settings
from .store_reads import StoreReads, StoreUnreadable
from .twilio_api import Fetched

log = get_logger("msgledger.poller")

PAGE = 500  # due messages read per query: a few ms of SQLite, minutes of fetching at most
BACKLOG_EVERY = 30.0  # seconds: how often a long pass refreshes the overdue gauges
Clock = Callable[[], dt.datetime]  # the wall clock the schedule reads (UTC)


def wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class PollerConfig:
    overdue_after: float  # seconds of age before the first poll
    give_up_after: float  # seconds of age after which a message is given up on
    interval: float  # seconds between passes
    concurrency: int  # fetches in flight at most

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
    started: float = field(default_factory=time.perf_counter)

    def fields(self) -> dict[str, Any]:
        return {"due": self.due, "polled": self.polled, "changed": self.changed,
                "flagged": self.flagged, "deferred": self.deferred,
                "not_journaled": self.not_journaled,
                "seconds": round(time.perf_counter() - self.started, 3)}


@dataclass(frozen=True)
class PollerDeps:
    journal: JournalClient  # closed when the poller ends
    fetch: Fetch
    reads: StoreReads
    metrics: PollerMetrics
    report: Report  # "running" or "paused: ..." for /healthz
    clock: Clock = wall_clock
    rng: random.Random = field(default_factory=random.Random)


async def run_poller(config: PollerConfig, deps: PollerDeps, stop: trio.Event, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a pass every `config.interval` until `stop` is set."""
    with deps.journal:
        poller = _Poller(config, deps)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when, stop, nursery.cancel_scope)
            task_status.started()
            while True:
                started = trio.current_time()
                try:
                    await poller.run_pass()
                except StoreUnreadable as error:  # the next pass tries again
                    log.error("poll_pass_failed", error=str(error))
                await trio.sleep_until(started + config.interval)


async def _cancel_when(stop: trio.Event, scope: trio.CancelScope) -> None:
    await stop.wait()
    scope.cancel()


class _Poller:
    def __init__(self, config: PollerConfig, deps: PollerDeps) -> None:
        self._config = config
        self._deps = deps
        self._pacer = Pacer(deps.fetch, concurrency=config.concurrency, metrics=deps.metrics,
                            report=deps.report, rng=deps.rng)
        self._backlog_at = -BACKLOG_EVERY  # Trio time the gauges were last refreshed

    async def run_pass(self) -> PassTally:
        """Poll every message due now; log what the pass did."""
        now, tally = self._deps.clock(), PassTally()
        await self._refresh_backlog(now)
        send, receive = trio.open_memory_channel[store.DueMessage](self._config.concurrency)
        async with trio.open_nursery() as workers:
            for _ in range(self._config.concurrency):
                workers.start_soon(self._work, receive.clone(), tally)
            receive.close()
            with send:
                await self._dispatch(now, send, tally)
        await self._refresh_backlog(self._deps.clock(), force=True)
        log.info("poll_pass", **tally.fields())
        return tally

    async def _dispatch(self, now: dt.datetime, send: trio.MemorySendChannel[store.DueMessage],
                        tally: PassTally) -> None:
        """Send every due message, page by page: first the never polled, then the rest."""
        lists = ((store.first_polls, _iso(now - self._overdue_after)),
                 (store.repolls, _iso(now)))
        for read_list, bound in lists:
            after = store.NO_CURSOR
            while page := await self._deps.reads.run(read_list, bound, after, PAGE):
                tally.due += len(page)
                for due in page:
                    await send.send(due)
                after = page[-1].cursor
                await self._refresh_backlog(self._deps.clock())

    async def _work(self, receive: trio.MemoryReceiveChannel[store.DueMessage],
                    tally: PassTally) -> None:
        with receive:
            async for due in receive:
                await self._poll(due, tally)

    async def _poll(self, due: store.DueMessage, tally: PassTally) -> None:
        answer = await self._pacer.fetch(due.sid)
        if answer is None:
            tally.deferred += 1
            return
        events = self._events(due, answer, self._deps.clock())
        replies = [await self._deps.journal.enqueue(event) for event in events]
        acks = [await reply.wait() for reply in replies]
        if any(isinstance(ack, JournalUnavailable) for ack in acks):
            log.warning("poll_not_journaled", sid=due.sid, error=str(acks[0]))
            self._deps.metrics.polls.labels("not_journaled").inc()
            tally.not_journaled += 1
            return
        self._count(due, answer, events, tally)

    def _events(self, due: store.DueMessage, answer: Fetched, now: dt.datetime) -> list[Event]:
        status = answer.resource.get("status") if answer.http_status == 200 else None
        if status in store.FINAL:
            return [polled_event(due.sid, answer, now, None)]
        again = next_poll(self._config, dt.datetime.fromisoformat(due.poll_from), now)
        events = [polled_event(due.sid, answer, now, again)]
        if again is None:
            events.append(Event("poll_gave_up", "poll", _iso(now), sid=due.sid, data={
                "polls": due.polls + 1, "poll_from": due.poll_from,
                "give_up_after": self._config.give_up_after}))
        return events

    def _count(self, due: store.DueMessage, answer: Fetched, events: Sequence[Event],
               tally: PassTally) -> None:
        tally.polled += 1
        status = events[0].status
        outcome = ("not_found" if answer.http_status == 404
                   else "error" if answer.http_status != 200
                   else "changed" if status != due.status else "unchanged")
        self._deps.metrics.polls.labels(outcome).inc()
        tally.changed += outcome == "changed"
        tally.flagged += (outcome == "not_found") + (len(events) > 1)
        if len(events) > 1:
            self._deps.metrics.gave_up.inc()
            log.info("poll_gave_up", sid=due.sid, polls=due.polls + 1, status=due.status)

    async def _refresh_backlog(self, now: dt.datetime, *, force: bool = False) -> None:
        if not force and trio.current_time() - self._backlog_at < BACKLOG_EVERY:
            return
        self._backlog_at = trio.current_time()
        count, oldest = await self._deps.reads.run(
            store.poll_backlog, _iso(now - self._overdue_after))
        self._deps.metrics.overdue.set(count)
        age = 0.0 if oldest is None else (now - dt.datetime.fromisoformat(oldest)).total_seconds()
        self._deps.metrics.oldest_age.set(max(0.0, age))

    @property
    def _overdue_after(self) -> dt.timedelta:
        return dt.timedelta(seconds=self._config.overdue_after)


def polled_event(sid: str, answer: Fetched, now: dt.datetime,
                 again: dt.datetime | None) -> Event:
    """Twilio's answer as the journal keeps it: its fields verbatim (or its error), and the
    next poll time the schedule set (none once the status is final or the poller gives up)."""
    data: dict[str, Any] = {"http_status": answer.http_status, **answer.resource}
    if answer.http_status != 200:
        data.update(error_code=answer.error_code, error_message=answer.error_message)
    if again is not None:
        data["next_poll_at"] = _iso(again)
    status = answer.resource.get("status") if answer.http_status == 200 else None
    return Event("polled", "poll", _iso(now), sid=sid,
                 status=status if isinstance(status, str) else None, data=data)


def _iso(moment: dt.datetime) -> str:
    """As the journal writes times: ISO 8601, UTC, microseconds (`events.utc_now`)."""
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds")
