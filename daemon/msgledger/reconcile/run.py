"""One reconcile run of one UTC day: read the source in batches, compare each with the
store, journal what is new, then settle what the source did not name.

A run's state (`Run`) is what `GET /v1/reconcile/runs/{run_id}` shows while it runs and
what its `reconcile_run` event keeps once it ends. It ends `done` (every page or line was
read and compared), `incomplete` (some could not be read: the next run covers the day
again) or `failed` (the store could not journal, or Twilio refuses the request for good).
"""

from __future__ import annotations

import collections
import datetime as dt
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeAlias, TypeVar

import trio

from ..events import Event, JournalUnavailable, Reply, iso_utc
from ..journal_client import JournalClient
from ..store import _reconcile as queries
from ..store_reads import StoreReads
from ..twilio_api import (
    CredentialsRefused,
    Fetched,
    FetchOutcome,
    Page,
    PageOutcome,
    PageRefused,
    Throttled,
)
from .compare import Candidates, Comparison, Day, Seen
from .rows import Broken, Parse, from_api, sid_of

Status: TypeAlias = Literal["running", "waiting_for_export", "done", "incomplete", "failed"]
Source: TypeAlias = Literal["auto", "list", "export"]
Clock = Callable[[], dt.datetime]  # the wall clock (UTC); virtual in tests
T = TypeVar("T")

PAGE_SIZE = 1000  # Twilio's most
MAX_TRIES = 8  # a throttled request is tried this often; then the run is incomplete
BACKOFF_FIRST = 1.0  # seconds, doubling, full jitter (docs/twilio.md, "Rate limits when reading")
BACKOFF_MOST = 60.0
SENT_LATE = dt.timedelta(days=1)  # how long before its listed day a send may have been made
BROKEN_KEPT = 20  # broken rows a report quotes verbatim; all are counted


@dataclass
class Run:
    """A run as it stands: its identity, its progress, and how it ended."""

    run_id: str
    day: dt.date
    asked: Source  # the source asked for
    trigger: Literal["daily", "api"]
    started_at: str
    source: Literal["list", "export"] | None = None  # the one used
    status: Status = "running"
    reason: str | None = None  # why incomplete or failed
    finished_at: str | None = None
    duration_s: float | None = None
    pages: int = 0
    lines: int = 0
    last_page: str | None = None  # the last list page read (its URI), for a resume by hand
    job_sid: str | None = None  # the Bulk Export job waited for
    export_ready: bool = False  # its job is done: the day file can be read
    export_state: str | None = None  # the day's state in its job (lower case), or READY
    waited_s: float = 0.0  # of duration_s, the time spent waiting for Twilio's answers
    tally: collections.Counter[str] = field(default_factory=collections.Counter)
    broken: list[dict[str, str]] = field(default_factory=list)
    recorded: trio.Event = field(default_factory=trio.Event, repr=False, compare=False)
    """Set once the run has ended and its `reconcile_run` event was journaled (or failed to
    be)."""

    def report(self) -> dict[str, Any]:
        """The run as `/v1/reconcile/runs` and its `reconcile_run` event show it."""
        return {"run_id": self.run_id, "date": self.day.isoformat(), "status": self.status,
                "source": self.source, "asked": self.asked, "trigger": self.trigger,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "duration_s": self.duration_s, "waited_s": round(self.waited_s, 3),
                "reason": self.reason, "pages": self.pages,
                "lines": self.lines, "last_page": self.last_page, "job_sid": self.job_sid,
                "counts": dict(sorted(self.tally.items())), "broken": list(self.broken),
                "complete": self.status == "done"}

    def note_broken(self, row: Broken) -> None:
        self.tally["broken"] += 1
        if len(self.broken) < BROKEN_KEPT:
            self.broken.append({"why": row.why, "raw": row.raw})


class RunEnded(Exception):
    """The run cannot go on: it ends with `status`, saying why."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, kw_only=True)
class RunDeps:
    journal: JournalClient
    reads: StoreReads
    list_page: Callable[[str | None, dict[str, str]], Awaitable[PageOutcome]]
    fetch: Callable[[str], Awaitable[FetchOutcome]]
    clock: Clock
    keep_body: str  # store.keep_body
    match_window: float  # seconds
    rng: random.Random = field(default_factory=random.Random)


@dataclass(frozen=True)
class Batch:
    """Part of a source: items as it gave them (JSON values; `Broken` lines that were no
    JSON), and how one is read into a row."""

    items: list[object]
    parse: Parse


async def reconcile_day(run: Run, batches: AsyncIterator[Batch], deps: RunDeps) -> None:
    """Compare every batch with the store, then the day's unlisted and unmatched; sets
    `run.status` (and `reason`). Raises nothing but cancellation."""
    begun, run.waited_s = time.perf_counter(), 0.0  # the reading's, not the export job's
    try:
        comparison = await _comparison(run, deps)
        async for batch in batches:
            await _compare_batch(comparison, batch, deps)
        await _settle_unlisted(run, comparison, deps)
        window_over = comparison.day.closes_at + dt.timedelta(seconds=deps.match_window)
        if deps.clock() >= window_over:  # a send of the day's last minutes may list late
            await journal_all(deps.journal, comparison.unmatched())
        run.status = "done"
    except RunEnded as ended:
        run.status, run.reason = ended.status, str(ended)
    run.finished_at = iso_utc(deps.clock())
    run.duration_s = round(time.perf_counter() - begun, 3)


async def list_batches(run: Run, deps: RunDeps) -> AsyncIterator[Batch]:
    """The day's listing (`DateSent` = the day, `PageSize` 1000) a page at a time,
    following `next_page_uri`; a throttled page is asked again, from the same URI."""
    run.source = "list"
    params = {"DateSent": run.day.isoformat(), "PageSize": str(PAGE_SIZE)}
    uri: str | None = None
    while True:
        page = await _page(uri, params, run, deps)
        run.pages += 1
        run.last_page = uri or "first"
        yield Batch(page.messages, from_api)
        if page.next_page_uri is None:
            return
        if page.next_page_uri == uri:
            raise RunEnded("failed", f"Twilio's page {run.pages} names itself as the next")
        uri = page.next_page_uri


async def _page(uri: str | None, params: dict[str, str], run: Run, deps: RunDeps) -> Page:
    where = f"page {run.pages + 1}"
    answer = await until_answered(partial(deps.list_page, uri, params), where, run, deps)
    if isinstance(answer, PageRefused):
        raise RunEnded("failed", f"Twilio refused the list at {where} (HTTP"
                       f" {answer.http_status}, code {answer.error_code}): {answer.message}")
    assert isinstance(answer, Page)
    return answer


async def until_answered(ask: Callable[[], Awaitable[T]], where: str, run: Run,
                         deps: RunDeps) -> T:
    """`ask()`'s answer once it is not Throttled (backing off between tries); RunEnded
    (incomplete) if it stays throttled or the credentials are refused. The time spent
    waiting for Twilio counts in `run.waited_s`."""
    began = time.perf_counter()
    try:
        return await _answered(ask, where, deps)
    finally:
        run.waited_s += time.perf_counter() - began


async def _answered(ask: Callable[[], Awaitable[T]], where: str, deps: RunDeps) -> T:
    for tries in range(1, MAX_TRIES + 1):
        answer = await ask()
        if isinstance(answer, CredentialsRefused):
            raise RunEnded("incomplete", f"Twilio refuses the credentials at {where} (HTTP"
                           f" {answer.http_status}): {answer.message}")
        if not isinstance(answer, Throttled):
            return answer
        if tries == MAX_TRIES:
            raise RunEnded("incomplete", f"Twilio did not answer {where} after {tries}"
                           f" tries: {answer.reason}")
        await trio.sleep(deps.rng.uniform(0, min(BACKOFF_MOST, BACKOFF_FIRST * 2 ** (tries - 1))))
    raise AssertionError("unreachable")


async def _comparison(run: Run, deps: RunDeps) -> Comparison:
    day = Day(run.day)
    margin = dt.timedelta(seconds=deps.match_window)
    # A send of the day before may be listed today (Twilio sent it after midnight): its
    # day's run flagged it not_created, and a match here withdraws that.
    start = iso_utc(dt.datetime.combine(run.day, dt.time(), dt.UTC) - SENT_LATE - margin)
    end = iso_utc(day.closes_at + margin)
    sends = await deps.reads.run(queries.unknown_sends, start, end)
    id_range = await deps.reads.run(queries.day_id_range, day.start, day.end)
    return Comparison(run.run_id, day, Candidates(sends, deps.match_window, start),
                      Seen(id_range),
                      deps.keep_body, lambda: iso_utc(deps.clock()), run.tally,
                      run.note_broken)


async def _compare_batch(comparison: Comparison, batch: Batch, deps: RunDeps) -> None:
    for start in range(0, len(batch.items), queries.BATCH):
        chunk = batch.items[start:start + queries.BATCH]
        sids = sorted({sid for item in chunk if (sid := sid_of(item)) is not None})
        known = await deps.reads.run(queries.known_sids, sids)
        for created in comparison.created_before_candidates(chunk, known, batch.parse):
            window = dt.timedelta(seconds=deps.match_window)
            moment = dt.datetime.fromisoformat(created)
            comparison.candidates.add(await deps.reads.run(
                queries.unknown_sends, iso_utc(moment - window), iso_utc(moment + window)))
        # Committed before the next batch is looked up: a SID listed twice is imported once.
        await journal_all(deps.journal, comparison.listed(chunk, known, batch.parse))


async def _settle_unlisted(run: Run, comparison: Comparison, deps: RunDeps) -> None:
    """Fetch each of the day's stored messages the source did not name (list lag, a null
    `date_sent`), before calling any of them missing."""
    after = 0
    while batch := await deps.reads.run(queries.day_messages, comparison.day.start,
                                        comparison.day.end, after):
        after = batch[-1].id
        for message in comparison.unlisted(batch):
            assert message.sid is not None
            answer = await until_answered(partial(deps.fetch, message.sid),
                                          f"the fetch of {message.sid}", run, deps)
            assert isinstance(answer, Fetched)
            await journal_all(deps.journal, comparison.after_fetch(message, answer))


async def journal_all(journal: JournalClient, events: list[Event]) -> None:
    """Journal `events`, all handed over before any is waited for (one commit, mostly);
    RunEnded (failed) if the journal cannot make one durable."""
    replies: list[Reply] = [await journal.enqueue(event) for event in events]
    for reply in replies:
        ack = await reply.wait()
        if isinstance(ack, JournalUnavailable):
            raise RunEnded("failed", f"the journal could not record a finding: {ack}")
