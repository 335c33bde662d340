"""The media fetcher: keeps a copy of every media file of the record (docs/inbound.md,
"Media").

Twilio deletes inbound media after 24 hours under Message Redaction and all media after
13 months, so msgledger fetches each file soon after the message is journaled, off the
webhook's path: it reads its work from the store (`store.due_media`: files `pending`, due
now or at their retry time) every `interval`, so a restart resumes where it stopped and a
front's messages are fetched like the main process's.

Credentials (the account's, HTTP Basic) go only to the URL the webhook named, which
`receipt` checked is the message's own path at Twilio; the redirect Twilio answers with, to
its CDN, is followed without them. An outbound message's files are found in Twilio's own
copy, its Media list, once its SID is known. Each outcome is journaled: `media_archived`
(content type, size, SHA-256; the bytes ride along when `store.keep_media = full`) or
`media_failed` (why, and when it is tried again, until the back-off runs out).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx
import trio

from .. import store
from ..drain import cancel_when
from ..events import Event, JournalUnavailable, iso_utc
from ..journal_client import JournalClient
from ..logs import get_logger
from ..metrics import Metrics
from ..poller import Clock
from ..store_reads import StoreReads, StoreUnreadable
from ..twilio_api import MediaListUnavailable
from .receipt import is_own_media, origin

log = get_logger("msgledger.media")

# Seconds before each retry of a file that failed: within the hour, then over the 24 hours
# Twilio keeps inbound media under redaction. Then the file is given up on (`failed`).
BACKOFF = (10.0, 60.0, 300.0, 1800.0, 3 * 3600.0, 8 * 3600.0)
MAX_REDIRECTS = 3
PAGE = 50  # messages read per pass
BUSY_WAITS = 8  # others' events waiting for the journal to take them: webhooks queue
PAUSE = 0.1  # seconds between passes while there is work: batches the store's reads
NOT_JOURNALED_PAUSE = 30.0  # seconds before a file whose outcome was not journaled is retried
MEDIA_TRUNCATED = "media_truncated"  # the record's flag: a file over store.max_media_bytes
_ACCOUNT = re.compile(r"/Accounts/(AC[0-9a-fA-F]{32})/")  # whose credentials a URL takes


class FetchFailed(Exception):
    """A file could not be fetched this time; the message says why."""


@dataclass(frozen=True)
class Fetched:
    content_type: str | None
    size: int
    sha256: str
    truncated: bool
    blob: bytes | None  # None unless kept
    url: str  # where the bytes came from at Twilio (its media URL)


# An outbound message's media at Twilio: the URLs of its Media list, in its order.
ListMedia = Callable[[str], Awaitable[list[str]]]
Backlog = Callable[[], int]  # events waiting in the journal's intake right now


@dataclass(frozen=True)
class MediaConfig:
    keep: str  # store.keep_media: full or hash (none: nothing is ever pending)
    max_bytes: int  # store.max_media_bytes
    api_base_url: str  # twilio.api_base_url: where an outbound message's media list is
    interval: float = 1.0  # seconds between reads of the work list
    concurrency: int = 16  # files fetched at once: each waits on two network hops
    timeout: float = 60.0  # seconds a file may take, redirects included
    backoff: tuple[float, ...] = BACKOFF


@dataclass(frozen=True)
class MediaDeps:
    journal: JournalClient
    reads: StoreReads
    auth_token: str  # with the account SID a media URL names, for Twilio's media URLs
    metrics: Metrics
    clock: Clock
    list_media: ListMedia | None  # None: no REST credentials, outbound media stays pending
    backlog: Backlog  # the journal's intake: while others' events queue, no fetch starts


async def run_media_fetcher(stop: trio.Event, *, config: MediaConfig, deps: MediaDeps,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
    """Fetch due files until `stop`; closes the journal client at the end."""
    fetcher = _Fetcher(config, deps)
    with deps.journal:
        async with httpx.AsyncClient(timeout=config.timeout, follow_redirects=False) as http:
            fetcher.http = http
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when, stop, nursery.cancel_scope)
                task_status.started()
                await fetcher.run(nursery)


class _Fetcher:
    def __init__(self, config: MediaConfig, deps: MediaDeps) -> None:
        self.config = config
        self.deps = deps
        self.http: httpx.AsyncClient | None = None
        self._limiter = trio.CapacityLimiter(config.concurrency)
        self._in_flight: set[tuple[str, int]] = set()
        self._journaling = 0  # of the intake's backlog, this fetcher's own events
        # Files settled since a read began: that read may still list them as due (its
        # snapshot predates the commit), and they must not be fetched twice. By Trio time.
        self._settled: dict[tuple[str, int], float] = {}
        self._origin = origin(config.api_base_url)
        # Files fetched whose outcome the journal did not take: not fetched again before
        # this Trio time, so a failing journal does not bring a download every pass.
        self._not_before: dict[tuple[str, int], float] = {}

    async def run(self, nursery: trio.Nursery) -> None:
        """Pass after pass: start the due files not in flight, then pause briefly while
        there is work, a whole `interval` when there is none. While webhooks queue on the
        journal (`busy`) no fetch starts: their answers are due within seconds, a file's
        within hours, and the backlog drains once the burst is over."""
        while True:
            read_at = trio.current_time()
            started = 0 if self._busy() else self._start(await self._due(), read_at, nursery)
            self._settled = {k: t for k, t in self._settled.items() if t >= read_at}
            await trio.sleep(PAUSE if started or self._in_flight else self.config.interval)

    def _busy(self) -> bool:
        """Whether other producers' events (webhooks, above all) queue for the journal."""
        return self.deps.backlog() - self._journaling >= BUSY_WAITS

    async def _due(self) -> list[store.MediaWork]:
        try:
            return await self.deps.reads.run(store.due_media, iso_utc(self.deps.clock()), PAGE)
        except StoreUnreadable as error:
            log.error("media_store_unreadable", error=str(error))
            return []

    def _start(self, work: list[store.MediaWork], read_at: float,
               nursery: trio.Nursery) -> int:
        started, now = 0, trio.current_time()
        for message in work:
            for item in message.due:
                key = (message.sid, item.n)
                if (key not in self._in_flight and self._not_before.get(key, 0) <= now
                        and self._settled.get(key, -math.inf) < read_at):
                    self._not_before.pop(key, None)
                    self._in_flight.add(key)
                    nursery.start_soon(self._fetch_one, message, item)
                    started += 1
        return started

    async def _fetch_one(self, message: store.MediaWork, item: store.MediaItem) -> None:
        try:
            async with self._limiter:
                try:
                    fetched = await self._fetch(message, item)
                except FetchFailed as failure:
                    journaled = await self._failed(message.sid, item, str(failure))
                except Exception as error:  # one file's surprise, not the fetcher's end
                    log.exception("media_fetch_error", sid=message.sid, n=item.n)
                    journaled = await self._failed(message.sid, item,
                                                   f"{type(error).__name__}: {error}"[:300])
                else:
                    journaled = await self._archived(message.sid, item, fetched)
            if journaled:
                self._settled[(message.sid, item.n)] = trio.current_time()
            else:
                self._not_before[(message.sid, item.n)] = trio.current_time() + NOT_JOURNALED_PAUSE
        finally:
            self._in_flight.discard((message.sid, item.n))

    async def _fetch(self, message: store.MediaWork, item: store.MediaItem) -> Fetched:
        url = item.url if message.direction == "inbound" else await self._listed(message, item)
        if url is None:
            raise FetchFailed("no URL to fetch it from")
        with trio.move_on_after(self.config.timeout):
            try:
                return await self._download(url, message.sid)
            except httpx.HTTPError as error:
                raise FetchFailed(f"{type(error).__name__}: {error}"[:300]) from None
        raise FetchFailed(f"not fetched within {self.config.timeout:g}s")

    async def _listed(self, message: store.MediaWork, item: store.MediaItem) -> str:
        """An outbound message's n-th file, as Twilio's Media list has it."""
        if self.deps.list_media is None:
            raise FetchFailed("no Twilio credentials to list the message's media")
        try:
            urls = await self.deps.list_media(message.sid)
        except MediaListUnavailable as error:
            raise FetchFailed(str(error)) from None
        if item.n >= len(urls):
            raise FetchFailed(f"Twilio lists {len(urls)} media for the message")
        return urls[item.n]

    async def _download(self, url: str, sid: str) -> Fetched:
        """The file at Twilio's `url`: credentials to it, none to where it redirects. Checked
        again here, whatever the receipt said: the credentials go only to message `sid`'s own
        media at `twilio.api_base_url` as it is configured now."""
        assert self.http is not None
        account = _ACCOUNT.search(url)
        if account is None or not is_own_media(url, self._origin, account[1], sid):
            raise FetchFailed(f"not this message's media at {self._origin}")
        auth: tuple[str, str] | None = (account[1], self.deps.auth_token)
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            async with self.http.stream("GET", target, auth=auth) as response:
                if response.is_redirect and "location" in response.headers:
                    target, auth = urljoin(target, response.headers["location"]), None
                    continue
                if response.status_code != 200:
                    raise FetchFailed(f"{_host(target)} answered {response.status_code}")
                return await self._read(response, url)
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    async def _read(self, response: httpx.Response, url: str) -> Fetched:
        digest, chunks, size = hashlib.sha256(), [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            digest.update(chunk)
            if size > self.config.max_bytes:
                break  # over the cap: what was read is hashed, none of it kept
            chunks.append(chunk)
        truncated = size > self.config.max_bytes
        keep = self.config.keep == "full" and not truncated
        return Fetched(response.headers.get("content-type"), size, digest.hexdigest(),
                       truncated, b"".join(chunks) if keep else None, url)

    async def _archived(self, sid: str, item: store.MediaItem, fetched: Fetched) -> bool:
        data: dict[str, object] = {
            "n": item.n, "url": fetched.url, "content_type": fetched.content_type,
            "size": fetched.size, "sha256": fetched.sha256, "kept": fetched.blob is not None,
            "truncated": fetched.truncated}
        if fetched.truncated:
            data["flags"] = [MEDIA_TRUNCATED]  # on the record: a file it holds only in part
        event = Event("media_archived", "media", iso_utc(self.deps.clock()), sid=sid, data=data,
                      blob=fetched.blob)
        outcome = "truncated" if fetched.truncated else "archived"
        if not await self._journal(event):
            return False
        self.deps.metrics.media_fetches.labels(outcome).inc()
        log.info("media_" + outcome, sid=sid, n=item.n, size=fetched.size,
                 content_type=fetched.content_type)
        return True

    async def _failed(self, sid: str, item: store.MediaItem, reason: str) -> bool:
        now = self.deps.clock()
        attempt = item.attempts + 1
        delay = self.config.backoff[item.attempts] if item.attempts < len(
            self.config.backoff) else None
        retry_at = None if delay is None else iso_utc(now + dt.timedelta(seconds=delay))
        event = Event("media_failed", "media", iso_utc(now), sid=sid, data={
            "n": item.n, "url": item.url, "error": reason, "attempt": attempt,
            "retry_at": retry_at})
        if not await self._journal(event):
            return False
        self.deps.metrics.media_fetches.labels("failed" if retry_at else "gave_up").inc()
        log.warning("media_failed", sid=sid, n=item.n, error=reason, attempt=attempt,
                    retry_at=retry_at)
        return True

    async def _journal(self, event: Event) -> bool:
        self._journaling += 1
        try:
            ack = await self.deps.journal.journal(event)
        finally:
            self._journaling -= 1
        if isinstance(ack, JournalUnavailable):  # the file stays pending: tried again
            log.warning("media_not_journaled", sid=event.sid, error=str(ack))
            return False
        return True


def _host(url: str) -> str:
    return httpx.URL(url).host or url
