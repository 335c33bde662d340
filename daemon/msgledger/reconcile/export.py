"""The export source of a run: Bulk Export's file of the day (docs/design.md, "The daily
reconciler"; docs/twilio.md, "Bulk Export").

If Twilio has the day's file, it is read at once. Otherwise a custom job is created for the
day, its SID journaled (`reconcile_export_job`, so a restart resumes the wait) and the run
waits, `waiting_for_export`, asking about the job every `reconciler.export_poll_interval`,
outside the queue (waiting is not listing). Once the job says the day is `Completed`, the
run reads the file; `CompletedEmptyRecords` means the day had no messages, and no file.

The file is read as it downloads, from a fresh one-time link; a download that fails is
begun again from a new link, skipping the lines already compared, `DOWNLOAD_TRIES` times
at most, then the run is `incomplete`.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from functools import partial

import trio
import urllib3

from ..events import Event, iso_utc
from ..store._reconcile import BATCH
from ..twilio_exports import EMPTY, FAILED, READY, BulkExport, DayLink, ExportRefused, Job
from .export_file import DayFile
from .rows import from_export
from .run import Batch, Run, RunDeps, RunEnded, journal_all, until_answered

DOWNLOAD_TRIES = 3
EXPORT_WAIT_MOST = 24 * 3600.0  # seconds a job may take (Twilio: minutes to hours); then
# the run is incomplete and holds no place in the queue any longer
Prepared = bool  # True: the file can be read now; False: the run waits for its job


async def prepare(run: Run, deps: RunDeps, bulk: BulkExport) -> Prepared:
    """Whether the day can be read now; if not, a job is asked for (and journaled)."""
    run.source = "export"
    if run.job_sid is not None:  # resumed after a restart
        return False
    day = run.day.isoformat()
    link = await until_answered(partial(bulk.day_link, day), "the day file", run, deps)
    if isinstance(link, ExportRefused):
        raise _refused("the day file", link)
    if isinstance(link, DayLink):
        run.export_state = READY
        return True
    job = await until_answered(partial(bulk.create_job, day, f"msgledger {run.run_id}"),
                               "the export job's creation", run, deps)
    if isinstance(job, ExportRefused):
        raise _refused("the export job's creation", job)
    assert isinstance(job, Job)
    run.job_sid, run.status, run.export_state = job.job_sid, "waiting_for_export", job.day_state
    await journal_all(deps.journal, [Event("reconcile_export_job", "reconcile",
                                           iso_utc(deps.clock()), data={
        "run_id": run.run_id, "date": day, "job_sid": job.job_sid})])
    return job.day_state in (READY, EMPTY)


async def wait_for_job(run: Run, deps: RunDeps, bulk: BulkExport, every: float) -> None:
    """Ask about the run's job every `every` seconds until the day is done; RunEnded if
    the job failed or cannot be asked about."""
    assert run.job_sid is not None
    run.status, waiting_since = "waiting_for_export", trio.current_time()
    while True:
        await trio.sleep(every)
        job = await until_answered(partial(bulk.job, run.job_sid, run.day.isoformat()),
                                   f"export job {run.job_sid}", run, deps)
        if isinstance(job, ExportRefused):
            raise _refused(f"export job {run.job_sid}", job)
        assert isinstance(job, Job)
        run.export_state = job.day_state
        if job.day_state in (READY, EMPTY):
            run.status = "running"
            return
        if job.day_state in FAILED:
            raise RunEnded("failed", f"export job {run.job_sid} ended {job.day_state}")
        if trio.current_time() - waiting_since > EXPORT_WAIT_MOST:
            raise RunEnded("incomplete", f"export job {run.job_sid} still says"
                           f" {job.day_state!r} after {EXPORT_WAIT_MOST / 3600:g} h; the next"
                           " daily run asks again")


async def export_batches(run: Run, deps: RunDeps, bulk: BulkExport) -> AsyncIterator[Batch]:
    """The day file's rows, a batch at a time; none for a day without a file."""
    compared, failure = 0, ""
    for _ in range(DOWNLOAD_TRIES):
        link = await until_answered(partial(bulk.day_link, run.day.isoformat()),
                                    "the day file", run, deps)
        if isinstance(link, ExportRefused):
            raise _refused("the day file", link)
        if not isinstance(link, DayLink):
            if run.export_state == EMPTY:
                return  # the job said so: the day had no messages, and there is no file
            raise RunEnded("incomplete", "Twilio has no file of the day although its export"
                           f" job said {run.export_state!r} (deleted after seven days?)")
        day_file = DayFile(bulk.download(link.url), skip=compared)
        try:
            while rows := await trio.to_thread.run_sync(day_file.batch, BATCH,
                                                        abandon_on_cancel=True):
                run.lines = day_file.lines
                yield Batch(rows, from_export)
                compared = day_file.lines  # compared and journaled: never again
            run.lines = day_file.lines
            return
        except (urllib3.exceptions.HTTPError, zlib.error, OSError) as error:
            failure = f"{type(error).__name__}: {error}"
            run.tally["downloads_failed"] += 1
    raise RunEnded("incomplete", f"the day file could not be downloaded after"
                   f" {DOWNLOAD_TRIES} tries ({compared} lines compared): {failure}")


def _refused(what: str, answer: ExportRefused) -> RunEnded:
    return RunEnded("failed", f"Twilio refused {what} (HTTP {answer.http_status}, code"
                    f" {answer.error_code}): {answer.message}")
