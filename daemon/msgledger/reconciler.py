"""The reconciler actor: every day at `reconciler.daily_at` (UTC) it reconciles the last
`reconciler.lookback_days` whole UTC days, and on demand any day up to today
(docs/design.md, "The daily reconciler").

Runs wait in one queue and run one at a time: one listing at a time, as Twilio's list is
one cursor per day and the account's concurrency is shared with sends and polls. Every run
is journaled when asked for (`reconcile_started`) and when it ends (`reconcile_run`, its
report), so a restart knows which runs it interrupted: each is recorded `incomplete`, and
the next daily run covers its day again.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .events import Event, JournalUnavailable, iso_utc
from .logs import get_logger
from .reconcile import export
from .reconcile.compare import Day
from .reconcile.run import Batch, Run, RunDeps, RunEnded, Source, list_batches, reconcile_day
from .settings import Settings
from .store import _reconcile as queries
from .store_reads import StoreUnreadable
from .twilio_exports import BulkExport

log = get_logger("msgledger.reconciler")

QUEUE_SIZE = 64  # runs asked for and not yet ended; more are refused (503)
KEPT_RUNS = 100  # finished runs kept in memory for /v1/reconcile/runs


@dataclass(frozen=True)
class ReconcilerConfig:
    daily_at: dt.time  # UTC
    lookback_days: int
    source: Source
    export_over: int
    export_poll_interval: float  # seconds
    match_window: float  # seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> ReconcilerConfig:
        hour, minute = settings.reconciler_daily_at.split(":")
        return cls(dt.time(int(hour), int(minute), tzinfo=dt.UTC),
                   settings.reconciler_lookback_days, settings.reconciler_source,  # type: ignore[arg-type]
                   settings.reconciler_export_over, settings.reconciler_export_poll_interval,
                   settings.reconciler_match_window)


class QueueFull(Exception):
    """Too many runs wait already."""


class Reconciler:
    """Takes runs (`request`), runs them in order (`serve`), and tells how they stand."""

    def __init__(self, config: ReconcilerConfig, deps: RunDeps, bulk: BulkExport) -> None:
        self._config = config
        self._deps = deps
        self._bulk = bulk
        self._nursery: trio.Nursery | None = None  # `serve`'s: export waits run in it
        # Every unended run fits: `request` refuses once QUEUE_SIZE of them are unended.
        self._send, self._receive = trio.open_memory_channel[Run](QUEUE_SIZE)
        self._runs: dict[str, Run] = {}  # this process's runs, newest last

    @property
    def clock(self) -> Callable[[], dt.datetime]:
        return self._deps.clock

    async def request(self, day: dt.date, source: Source, trigger: Any = "api") -> Run:
        """Queue a run of `day`, journaled first (`reconcile_started`); or, if the same day
        and source is queued or running already, return that one. JournalUnavailable if it
        could not be journaled, QueueFull if too many wait."""
        for run in self._runs.values():
            if (run.day, run.asked, run.finished_at) == (day, source, None):
                return run
        if sum(run.finished_at is None for run in self._runs.values()) >= QUEUE_SIZE:
            raise QueueFull(f"{QUEUE_SIZE} runs are waiting already")
        run = Run(run_id="RN" + secrets.token_hex(16), day=day, asked=source, trigger=trigger,
                  started_at=iso_utc(self.clock()))
        self._runs[run.run_id] = run  # a second request meanwhile finds it
        ack = await self._deps.journal.journal(self._event("reconcile_started", {
            "run_id": run.run_id, "date": day.isoformat(), "asked": source,
            "trigger": trigger}))
        if isinstance(ack, JournalUnavailable):
            del self._runs[run.run_id]
            raise ack
        await self._send.send(run)
        self._forget_old()
        return run

    @property
    def _tasks(self) -> trio.Nursery:
        assert self._nursery is not None, "only while serving"
        return self._nursery

    def run(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def runs(self) -> list[Run]:
        """This process's runs, newest first."""
        return list(reversed(self._runs.values()))

    async def serve(self, stop: trio.Event, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run queued runs until `stop`, and ask for the daily ones; closes the journal
        client at the end. A run under way at `stop` is recorded `incomplete`; one waiting
        for its export job is left to the next start, which resumes the wait."""
        with self._deps.journal:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._take_over()
                nursery.start_soon(self._daily)
                nursery.start_soon(self._run_queue)
                task_status.started()
                await stop.wait()
                nursery.cancel_scope.cancel()

    async def _run_queue(self) -> None:
        async for run in self._receive:
            await self._run_one(run)

    async def _run_one(self, run: Run) -> None:
        log.info("reconcile_started", run_id=run.run_id, date=run.day.isoformat(),
                 asked=run.asked, trigger=run.trigger)
        waits = False
        try:
            batches = await self._batches(run)
            if batches is None:
                waits = True
                self._tasks.start_soon(self._await_export, run)
                return
            await reconcile_day(run, batches, self._deps)
        except RunEnded as ended:  # before the day's reading began (the source's choice)
            self._end(run, ended.status, str(ended))
        except StoreUnreadable as error:  # the run fails; the daemon, whose store it is, not
            self._end(run, "failed", f"the store cannot be read: {error}")
        except Exception as error:  # input no rule foresaw: this run fails, nothing else
            log.exception("reconcile_run_crashed", run_id=run.run_id)
            self._end(run, "failed", f"{type(error).__name__}: {error}"[:500])
        finally:
            if not waits:
                if run.finished_at is None:  # cancelled: the daemon stops
                    self._end(run, "incomplete", "the daemon stopped during the run")
                await self._record(run)

    async def _batches(self, run: Run) -> AsyncIterator[Batch] | None:
        """The run's source, ready to read; None if the run must wait for its export."""
        source = run.source or await self._choose(run)
        if source == "list":
            return list_batches(run, self._deps)
        if run.day > exportable_until(self.clock()):
            if run.trigger == "daily":  # reconciler.source = export: yesterday is listed
                return list_batches(run, self._deps)
            raise RunEnded("failed", "Bulk Export makes files only of days at least two days"
                           f" old: {run.day} is too recent (use the list)")
        if run.export_ready or await export.prepare(run, self._deps, self._bulk):
            return export.export_batches(run, self._deps, self._bulk)
        return None

    async def _await_export(self, run: Run) -> None:
        """Wait for the run's export job (outside the queue), then queue its reading."""
        try:
            await export.wait_for_job(run, self._deps, self._bulk,
                                      self._config.export_poll_interval)
        except RunEnded as ended:
            self._end(run, ended.status, str(ended))
            await self._record(run)
            return
        except Exception as error:  # as in _run_one: the run fails, the daemon goes on
            log.exception("reconcile_run_crashed", run_id=run.run_id)
            self._end(run, "failed", f"{type(error).__name__}: {error}"[:500])
            await self._record(run)
            return
        run.export_ready = True
        await self._send.send(run)

    def _end(self, run: Run, status: Any, reason: str) -> None:
        run.status, run.reason, run.finished_at = status, reason, iso_utc(self.clock())

    async def _record(self, run: Run) -> None:
        """Journal the run's report (within the journal's bound even while stopping)."""
        report = run.report()
        ack = await self._deps.journal.journal_shielded(self._event("reconcile_run", report))
        if isinstance(ack, JournalUnavailable):
            log.error("reconcile_run_not_journaled", run_id=run.run_id, error=str(ack))
        log.info("reconcile_run", **{k: v for k, v in report.items() if k != "broken"})
        run.recorded.set()

    async def _choose(self, run: Run) -> str:
        if run.asked != "auto":
            return run.asked
        if run.day > exportable_until(self.clock()):
            return "list"
        day = Day(run.day)
        count = await self._deps.reads.run(queries.day_count, day.start, day.end)
        return "export" if count > self._config.export_over else "list"

    async def _daily(self) -> None:
        while True:
            now = self.clock()
            due = dt.datetime.combine(now.date(), self._config.daily_at)
            if due <= now:
                due += dt.timedelta(days=1)
            await trio.sleep((due - now).total_seconds())
            today = self.clock().date()
            for back in range(self._config.lookback_days, 0, -1):
                try:
                    await self.request(today - dt.timedelta(days=back), self._config.source,
                                       "daily")
                except (JournalUnavailable, QueueFull) as error:
                    log.error("reconcile_not_started", date=str(today - dt.timedelta(back)),
                              error=str(error))

    async def _take_over(self) -> None:
        """The runs the last process left unended: one waiting for its export job waits
        on here; any other is recorded `incomplete`."""
        for left in await self._deps.reads.run(_unfinished):
            run = left.as_run()
            self._runs[run.run_id] = run
            if run.job_sid is not None:
                log.info("reconcile_resumed", run_id=run.run_id, job_sid=run.job_sid)
                self._tasks.start_soon(self._await_export, run)
            else:
                self._end(run, "incomplete", "the daemon stopped during the run")
                await self._record(run)

    def _forget_old(self) -> None:
        finished = [r for r in self._runs.values() if r.finished_at is not None]
        for old in finished[:max(0, len(finished) - KEPT_RUNS)]:
            del self._runs[old.run_id]

    def _event(self, kind: Any, data: dict[str, Any]) -> Event:
        return Event(kind, "reconcile", iso_utc(self.clock()), data=data)


def exportable_until(now: dt.datetime) -> dt.date:
    """The latest day Bulk Export can make a file of: two days before today (UTC)."""
    return now.astimezone(dt.UTC).date() - dt.timedelta(days=2)


@dataclass
class _Unended:
    """A run a `reconcile_started` began and no `reconcile_run` ended."""

    started: queries.RunEvent
    job_sid: str | None = None

    def as_run(self) -> Run:
        data = self.started.data
        run = Run(run_id=str(data["run_id"]), day=dt.date.fromisoformat(str(data["date"])),
                  asked=data.get("asked", "auto"), trigger=data.get("trigger", "api"),
                  started_at=self.started.at, job_sid=self.job_sid)
        if self.job_sid is not None:
            run.source, run.status = "export", "waiting_for_export"
        return run


def _unfinished(conn: Any) -> list[_Unended]:
    """Every run the journal shows begun and not ended, oldest first."""
    ended: set[str] = set()
    jobs: dict[str, str] = {}
    unended: list[_Unended] = []
    for event in queries.iter_run_events(conn):  # newest first: an end before its start
        run_id = str(event.data.get("run_id"))
        if event.kind == "reconcile_run":
            ended.add(run_id)
        elif event.kind == "reconcile_export_job":
            jobs.setdefault(run_id, str(event.data.get("job_sid")))
        elif run_id not in ended:
            unended.append(_Unended(event, jobs.get(run_id)))
    return unended[::-1]
