"""Bulk Export's state: custom jobs, the day files they make, and one-time download links.

Nothing runs in the background. A job is due `export_job_delay` seconds of Trio time after it
was created, so a test on virtual time skips the wait, and every export request first settles
the jobs that are due: the first request to see a job due completes it, in that request, and
makes each of its days' files from the messages as they are at that moment. A file is then a
snapshot, as at Twilio: a message that changes later is not changed in it; a later job that
covers the day makes a new file. That request carries the work: about 5 s for a day of a
million messages on the two-core machine of the benchmarks, during which the simulator
answers nothing else (a worker thread would let Trio's autojump clock leap mid-file).

Files are kept in memory, whole and compressed (`_export_file.py`; 45 MB for a million
messages). A link is good for one download within `export_link_ttl` Trio seconds, like a
signed storage URL.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from functools import partial

import trio

from ._export_file import day_file, export_day, inbound_lines
from ._knobs import Dice, SimKnobs
from ._store import SimMessage, utcnow
from ._wire import hides_number, redacts_to

COMPLETED = "Completed"  # the day had records: its file is made
EMPTY = "CompletedEmptyRecords"  # the day had none: no file
DAYS_PER_UTC_DAY = 366  # Twilio's quota: days an account may ask for per UTC day, all jobs


@dataclass(frozen=True)
class JobRequest:
    """A validated custom-job request."""

    friendly_name: str
    start_day: date
    end_day: date
    webhook_url: str | None  # kept and shown; the simulator calls no webhook
    webhook_method: str | None
    email: str | None

    @property
    def days(self) -> tuple[date, ...]:
        count = (self.end_day - self.start_day).days + 1
        return tuple(self.start_day + timedelta(days=n) for n in range(count))


@dataclass(frozen=True)
class ExportJob:
    """A custom job; `outcomes` is set when it completes."""

    sid: str  # "JS" + 32 hex
    request: JobRequest
    created_at: float  # Trio time
    due_at: float  # Trio time from which it is complete
    outcomes: Mapping[date, str] | None = None  # per day: COMPLETED or EMPTY
    completed_on: datetime | None = None  # UTC, when it completed


@dataclass(frozen=True)
class DayFile:
    """One day's export file, as made."""

    day: date
    data: bytes  # gzip
    create_date: date  # the UTC day it was made
    friendly_name: str  # the job's that made it


@dataclass(frozen=True)
class _Link:
    file: DayFile
    expires_at: float  # Trio time


class BulkExports:
    """Jobs by SID, files by day, links by token; see the module docstring for the timing."""

    def __init__(self, dice: Dice) -> None:
        self._dice = dice
        self._jobs: dict[str, ExportJob] = {}
        self._files: dict[date, DayFile] = {}
        self._links: dict[str, _Link] = {}
        self._raw_lines: defaultdict[date, list[bytes]] = defaultdict(list)
        self._days_asked: Counter[date] = Counter()  # days requested, by UTC day of asking
        self._failing_downloads = 0

    def create(self, request: JobRequest, knobs: SimKnobs) -> ExportJob | None:
        """A new job, or None when it would take the account past today's quota."""
        today = utcnow().date()
        if self._days_asked[today] + len(request.days) > DAYS_PER_UTC_DAY:
            return None
        self._days_asked[today] += len(request.days)
        now = trio.current_time()
        job = ExportJob("JS" + self._dice.hex32(), request, now, now + knobs.export_job_delay)
        self._jobs[job.sid] = job
        return job

    def job(self, sid: str) -> ExportJob | None:
        return self._jobs.get(sid)

    def jobs(self) -> list[ExportJob]:
        """Every job, oldest first."""
        return list(self._jobs.values())

    def file(self, day: date) -> DayFile | None:
        return self._files.get(day)

    def files(self) -> list[DayFile]:
        """Every day's latest file, by day."""
        return [self._files[day] for day in sorted(self._files)]

    def settle(self, messages: Iterable[SimMessage], knobs: SimKnobs) -> None:
        """Complete every job now due, oldest first, making the files of its days."""
        now = trio.current_time()
        for job in self.jobs():
            if job.outcomes is None and job.due_at <= now:
                self._complete(job, messages, knobs)

    def open_link(self, file: DayFile, ttl: float) -> str:
        """A fresh one-time token for `file`, valid for `ttl` Trio seconds."""
        now = trio.current_time()
        self._links = {t: link for t, link in self._links.items() if link.expires_at > now}
        token = self._dice.hex32()
        self._links[token] = _Link(file, now + ttl)
        return token

    def take(self, token: str) -> DayFile | None:
        """The file behind a link, which this uses up; None if used, expired or unknown."""
        link = self._links.pop(token, None)
        if link is None or link.expires_at <= trio.current_time():
            return None
        return link.file

    def fail_downloads(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        self._failing_downloads = count

    def cuts_download(self) -> bool:
        """Whether this download is one `fail_downloads` asked to fail; it counts against it."""
        if self._failing_downloads == 0:
            return False
        self._failing_downloads -= 1
        return True

    def add_line(self, day: date, raw: bytes) -> None:
        self._raw_lines[day].append(raw)

    def _complete(self, job: ExportJob, messages: Iterable[SimMessage], knobs: SimKnobs) -> None:
        made = utcnow()
        by_day = _by_day(messages, job.request.days)
        outcomes: dict[date, str] = {}
        for day in job.request.days:
            day_messages, raw = by_day.get(day, []), self._raw_lines.get(day, [])
            if not day_messages and not raw:
                outcomes[day] = EMPTY
                continue
            inbound = inbound_lines(day, knobs.export_inbound_per_day, knobs.account_sid,
                                    self._dice, redact_from=partial(hides_number, knobs, now=made))
            data = day_file(day_messages, inbound, raw,
                            redact_to=partial(redacts_to, knobs, now=made))
            self._files[day] = DayFile(day, data, made.date(), job.request.friendly_name)
            outcomes[day] = COMPLETED
        self._jobs[job.sid] = replace(job, outcomes=outcomes, completed_on=made)


def _by_day(messages: Iterable[SimMessage], days: Iterable[date]) -> dict[date, list[SimMessage]]:
    """The messages of each of `days`, in creation order, in one pass."""
    wanted = set(days)
    found: dict[date, list[SimMessage]] = {}
    for message in messages:
        day = export_day(message)
        if day in wanted:
            found.setdefault(day, []).append(message)
    return found
