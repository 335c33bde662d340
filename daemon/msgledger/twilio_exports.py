"""Bulk Export as the reconciler uses it, through the `twilio` client's `bulkexports`
domain (`twilio.bulkexports_base_url`) (docs/twilio.md, "Bulk Export").

Each call is tried once and answers what Twilio said, or `Throttled` (no answer now: back
off), `CredentialsRefused`, or `ExportRefused` (an answer that asking again will not
change). The day file itself is downloaded through the same connection pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.rest import Client

from .reconcile.export_file import chunks_of
from .twilio_api import CredentialsRefused, Fetched, Throttled, TwilioApi, fetch_error

T = TypeVar("T")

# A day's state in a job, compared case-insensitively: the spec writes `Completed`, the
# API reference's own example `COMPLETED`.
READY = "completed"
EMPTY = "completedemptyrecords"  # the day had no messages: there is no file
FAILED = ("errorduringrun", "failed", "deletedbyuserrequest", "runningtobedeleted")


@dataclass(frozen=True)
class DayLink:
    """Where the day's file can be downloaded: a one-time link, valid for minutes."""

    url: str


@dataclass(frozen=True)
class NoDayFile:
    """Twilio has no file for the day (404)."""


@dataclass(frozen=True)
class Job:
    """A custom export job, and the state it gives the day asked for (lower case; None if
    its details do not name the day)."""

    job_sid: str
    day_state: str | None


@dataclass(frozen=True)
class ExportRefused:
    http_status: int
    error_code: int | None
    message: str


Answer = Throttled | CredentialsRefused | ExportRefused


class BulkExport:
    """The three calls of a day's export, and its download."""

    def __init__(self, api: TwilioApi) -> None:
        self._api = api

    async def day_link(self, day: str) -> DayLink | NoDayFile | Answer:
        """`GET /v1/Exports/Messages/Days/{day}`: 307 with `redirect_to`, or 404."""
        def fetch(client: Client) -> Any:
            return client.bulkexports.v1.exports("Messages").days(day).fetch()

        found = await self._ask(fetch, not_found=NoDayFile())
        if isinstance(found, Answer | NoDayFile):
            return found
        url = getattr(found, "redirect_to", None)
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            return ExportRefused(200, None, f"the day answered no download link: {url!r:.200}")
        return DayLink(url)

    async def create_job(self, day: str, friendly_name: str) -> Job | Answer:
        """`POST /v1/Exports/Messages/Jobs` for the one day."""
        def create(client: Client) -> Any:
            return client.bulkexports.v1.exports("Messages").export_custom_jobs.create(
                start_day=day, end_day=day, friendly_name=friendly_name)

        created = await self._ask(create)
        return created if isinstance(created, Answer) else _job(created, day)

    async def job(self, job_sid: str, day: str) -> Job | Answer:
        """`GET /v1/Exports/Jobs/{job_sid}`."""
        def fetch(client: Client) -> Any:
            return client.bulkexports.v1.exports.jobs(job_sid).fetch()

        found = await self._ask(fetch)
        return found if isinstance(found, Answer) else _job(found, day)

    def download(self, url: str) -> Iterator[bytes]:
        """The file's compressed bytes as they arrive (blocking: call it from a worker
        thread); urllib3's errors if the download fails. No credentials go with it: the
        link is signed."""
        answer = self._api.http.pool_for(url).request(
            # decode_content off: the gzip is the file, whatever Content-Encoding says.
            "GET", url, preload_content=False, decode_content=False, redirect=False,
            retries=False,
            timeout=urllib3.Timeout(connect=self._api.config.timeout,
                                    read=self._api.config.timeout))
        try:
            if answer.status != 200:
                raise urllib3.exceptions.HTTPError(
                    f"the download link answered HTTP {answer.status}")
            yield from chunks_of(answer)
        finally:
            answer.release_conn()

    async def _ask(self, call: Callable[[Client], T],
                   not_found: NoDayFile | None = None) -> T | NoDayFile | Answer:
        try:
            return await self._api.call(call, abandon_on_cancel=True)
        except TwilioRestException as e:
            status, code, message = e.status, e.code, str(e.msg)
        except TwilioServiceException as e:
            status, code, message = e.status, e.code, str(e.detail or e.title)
        except urllib3.exceptions.HTTPError as e:
            return Throttled(f"{type(e).__name__}: {e}")
        except Exception as e:  # a 2xx the client could not read (not JSON, wrong shape)
            return ExportRefused(200, None, f"unreadable answer: {type(e).__name__}: {e}"[:300])
        if status == 404 and not_found is not None:
            return not_found
        refused = fetch_error(status, code, message)
        if isinstance(refused, Fetched):
            return ExportRefused(refused.http_status, refused.error_code, message)
        return refused


def _job(instance: Any, day: str) -> Job | ExportRefused:
    sid = getattr(instance, "job_sid", None)
    if not isinstance(sid, str) or not sid:
        return ExportRefused(200, None, "the job answer has no job_sid")
    return Job(sid, day_state(getattr(instance, "details", None), day))


def day_state(details: object, day: str) -> str | None:
    """The state `details` (a list of `{status, count, days}` groups) gives `day`, lower
    case; None if no group names it."""
    if not isinstance(details, list):
        return None
    for group in details:
        days = group.get("days") if isinstance(group, dict) else None
        if isinstance(days, list) and day in days:
            status = group.get("status")
            return status.lower() if isinstance(status, str) else None
    return None
