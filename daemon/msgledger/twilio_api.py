"""The Twilio REST API as msgledger uses it: the synchronous `twilio` client in worker
threads, under a concurrency limit, with the retry rules the record needs.

A create is retried only when Twilio certainly did not process it: a 429 (Twilio's own
words: "never processed and always safe to retry") or a connection that was never made.
When those retries run out the attempt is `Rejected`: certainly not sent.
A 5xx, a timeout or a dropped answer may have created the message, so it comes back as
`Unknown` and is never retried: retrying could send the message twice. The reconciler
settles those attempts later.

A fetch is tried once: the poller that calls it does its own backoff, so the outcome only
says whether Twilio spoke about the message (`Fetched`), did not this time (`Throttled`),
or refuses our credentials (`CredentialsRefused`).
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import orjson
import trio
import urllib3
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.rest import Client

from .logs import get_logger
from .twilio_http import PooledHttpClient

T = TypeVar("T")
log = get_logger("msgledger.twilio")

MAX_ATTEMPTS = 5  # a create refused this often (429 or no connection) is recorded rejected


@dataclass(frozen=True)
class Accepted:
    """Twilio created the message."""

    sid: str
    status: str
    resource: Mapping[str, Any]


@dataclass(frozen=True)
class Rejected:
    """Twilio refused, or was never reached: an unsuccessful attempt, part of the record."""

    http_status: int | None  # None: no connection to Twilio could be made
    error_code: int | None
    error_message: str


@dataclass(frozen=True)
class Unknown:
    """The request may have reached Twilio, but no answer says what happened."""

    reason: str
    attempts: int = 1


CreateOutcome = Accepted | Rejected | Unknown


@dataclass(frozen=True)
class Fetched:
    """Twilio answered about the message: 200 with its resource, or a 4xx about it (404: not
    found)."""

    http_status: int
    resource: Mapping[str, Any]  # on 200 the FETCHED_FIELDS, JSON-serialisable; else {}
    error_code: int | None = None  # Twilio's code on a 4xx (20404...)
    error_message: str | None = None  # Twilio's, or why a 200 could not be read

    @property
    def status(self) -> str | None:
        """The message's status, if the answer gave one (a 200 that could be read)."""
        found = self.resource.get("status")
        return found if self.http_status == 200 and isinstance(found, str) else None


@dataclass(frozen=True)
class Throttled:
    """No answer about the message this time: 429, 5xx, a timeout or a connection error.
    Try again later, slower."""

    reason: str
    http_status: int | None = None  # None: no usable HTTP answer


@dataclass(frozen=True)
class CredentialsRefused:
    """401 or 403: Twilio refuses these credentials; every fetch will fail the same way until
    they change."""

    http_status: int
    error_code: int | None
    message: str


FetchOutcome = Fetched | Throttled | CredentialsRefused


@dataclass(frozen=True)
class Page:
    """A page of the Messages list: its items as Twilio sent them, and where the next is."""

    messages: list[Any]
    next_page_uri: str | None  # relative, PageToken included; None on the last page


@dataclass(frozen=True)
class PageRefused:
    """Twilio answered the list with a 4xx other than 401/403 (400 20004: past retention),
    or with a 200 that is no page: asking again will not help."""

    http_status: int
    error_code: int | None
    message: str


PageOutcome = Page | PageRefused | Throttled | CredentialsRefused


class MediaListUnavailable(Exception):
    """Twilio did not list a message's media this time; the message says why."""

CREATED_FIELDS = ("sid", "status", "to", "from_", "messaging_service_sid", "date_created",
                  "date_sent", "num_segments", "error_code", "error_message", "price",
                  "price_unit", "account_sid")
FETCHED_FIELDS = ("sid", "status", "error_code", "error_message", "date_sent", "date_updated",
                  "price", "price_unit", "num_segments")


@dataclass(frozen=True)
class TwilioConfig:
    account_sid: str
    auth_token: str
    base_url: str = "https://api.twilio.com"
    bulkexports_base_url: str = "https://bulkexports.twilio.com"
    concurrency: int = 10  # requests in flight; Twilio answers 429 past the account's limit
    timeout: float = 15.0  # seconds per HTTP request
    backoff: float = 0.5  # seconds before the first retry; doubles, with full jitter
    rng: random.Random = field(default_factory=random.Random, compare=False)


class TwilioApi:
    """Calls the Messages API from worker threads, one twilio client per thread, all on one
    connection pool (`twilio_http`)."""

    def __init__(self, config: TwilioConfig) -> None:
        self._config = config
        self._limiter = trio.CapacityLimiter(config.concurrency)
        self._local = threading.local()
        self._http = PooledHttpClient(config.base_url, timeout=config.timeout,
                                      connections=config.concurrency)

    def _client(self) -> Client:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            # A non-empty environment keeps TWILIO_EDGE/TWILIO_REGION from rewriting the
            # host (docs/twilio.md, "Pointing the twilio client at the simulator").
            client = Client(self._config.account_sid, self._config.auth_token,
                            http_client=self._http, environment={"MSGLEDGER": "1"})
            client.api.base_url = self._config.base_url
            client.bulkexports.base_url = self._config.bulkexports_base_url
            self._local.client = client
        return client

    @property
    def config(self) -> TwilioConfig:
        return self._config

    @property
    def http(self) -> PooledHttpClient:
        """The connection pool under every client (a download goes through it too)."""
        return self._http

    async def call(self, fn: Callable[[Client], T], *, abandon_on_cancel: bool = False) -> T:
        """`fn(client)` in a worker thread, on that thread's client, within
        `twilio.concurrency`."""
        return await trio.to_thread.run_sync(lambda: fn(self._client()), limiter=self._limiter,
                                             abandon_on_cancel=abandon_on_cancel,
                                             thread_name="twilio")  # for top -H and py-spy

    async def create_message(self, params: Mapping[str, Any]) -> CreateOutcome:
        """Create a message; retried only while Twilio certainly did not process it."""
        give_up = Rejected(None, None, "no attempt made")
        for attempt in range(1, MAX_ATTEMPTS + 1):
            outcome = await self._create_once(params)
            if not isinstance(outcome, _Retry):
                return outcome
            give_up = outcome.give_up
            log.warning("create_retried", attempt=attempt, reason=give_up.error_message)
            if attempt < MAX_ATTEMPTS:
                await trio.sleep(self._delay(attempt))
        return give_up

    def _delay(self, attempt: int) -> float:
        return self._config.rng.uniform(0, self._config.backoff * 2 ** (attempt - 1))

    async def _create_once(self, params: Mapping[str, Any]) -> CreateOutcome | _Retry:
        try:
            message = await self.call(lambda c: c.messages.create(**params))
        except TwilioRestException as e:
            return _refusal(e.status, e.code, str(e.msg))
        except TwilioServiceException as e:  # an RFC 9457 error body: its own status and code
            return _refusal(e.status, e.code, str(e.detail or e.title))
        except urllib3.exceptions.ConnectTimeoutError as e:  # NewConnectionError is one
            return _Retry(Rejected(None, None, f"Twilio unreachable: {e}"))
        except urllib3.exceptions.ProtocolError as e:
            return Unknown(f"connection lost: {e}")
        except urllib3.exceptions.HTTPError as e:  # a read timeout, a TLS or proxy error...
            return Unknown(f"{type(e).__name__}: {e}")
        return Accepted(message.sid, message.status, _resource(message, CREATED_FIELDS))

    async def fetch_message(self, sid: str) -> FetchOutcome:
        """Fetch one message by SID, once; no retries, the caller backs off itself."""
        # Quoted, so a malformed SID stays one path segment and Twilio answers 404 for it.
        quoted = quote(sid, safe="")
        return await self._read(lambda c: c.messages(quoted).fetch(), fetched)

    async def check_credentials(self) -> FetchOutcome:
        """Fetch the account itself, once: whether Twilio takes these credentials at all,
        whatever it thinks of any one message (the poller's probe while paused)."""
        sid = self._config.account_sid
        return await self._read(lambda c: c.api.v2010.accounts(sid).fetch(), _account)

    async def list_media(self, sid: str) -> list[str]:
        """The URLs of message `sid`'s media files at Twilio, in its Media list's order;
        MediaListUnavailable when Twilio does not answer with the list."""
        base = self._config.base_url

        def get(client: Client) -> list[str]:
            return [base + str(m.uri).removesuffix(".json")
                    for m in client.api.v2010.account.messages(sid).media.list()]

        try:
            return await self.call(get)
        except TwilioRestException as error:
            raise MediaListUnavailable(f"Twilio answered {error.status} to the media list"
                                       f" ({error.code})") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise MediaListUnavailable(f"{type(error).__name__}: {error}"[:300]) from None

    async def list_page(self, next_page_uri: str | None,
                        params: Mapping[str, str]) -> PageOutcome:
        """One page of the Messages list: the first (with `params`), or the one
        `next_page_uri` names (its query holds everything). Once, no retries."""
        def get(client: Client) -> Any:
            if next_page_uri is not None:
                return client.api.request("GET", next_page_uri)
            uri = f"/Accounts/{self._config.account_sid}/Messages.json"
            return client.api.v2010.request("GET", uri, params=dict(params))

        try:
            answer = await self.call(get, abandon_on_cancel=True)
        except urllib3.exceptions.HTTPError as e:
            return Throttled(f"{type(e).__name__}: {e}")
        return page_of(int(answer.status_code), answer.text)

    async def _read(self, fetch: Callable[[Client], T],
                    answer: Callable[[T], Fetched]) -> FetchOutcome:
        """One GET through the client, its answer or its failure as a FetchOutcome."""
        try:
            # A read: a shutdown need not wait for its answer (up to twilio.timeout).
            found = await self.call(fetch, abandon_on_cancel=True)
        except TwilioRestException as e:
            return fetch_error(e.status, e.code, str(e.msg))
        except TwilioServiceException as e:  # an RFC 9457 error body: its own status and code
            return fetch_error(e.status, e.code, str(e.detail or e.title))
        except urllib3.exceptions.HTTPError as e:  # no connection, a timeout, a cut answer
            return Throttled(f"{type(e).__name__}: {e}")
        except Exception as e:  # the client could not read a 2xx (see `unreadable`)
            return unreadable(e)
        return answer(found)


def page_of(status: int, text: str) -> PageOutcome:
    """What a list answer means: a page, or why there is none."""
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        body = None
    if status == 200:
        items = body.get("messages") if isinstance(body, dict) else None
        following = body.get("next_page_uri") if isinstance(body, dict) else None
        if not isinstance(items, list) or not isinstance(following, str | None):
            return PageRefused(200, None, f"not a page of messages: {text[:200]!r}")
        return Page(items, following or None)
    error = body if isinstance(body, dict) else {}
    message = str(error.get("message") or text[:200])
    refused = fetch_error(status, error.get("code"), message)
    if isinstance(refused, Fetched):
        return PageRefused(status, refused.error_code, message)
    return refused


def fetched(message: Any) -> Fetched:
    """A fetch's 200 answer (the client's MessageInstance) as the poller keeps it; one whose
    status is not text is unreadable (Twilio's enum is strings)."""
    resource = _resource(message, FETCHED_FIELDS)
    if not isinstance(resource.get("status"), str):
        return Fetched(200, {}, None, f"unreadable answer: status {resource.get('status')!r:.80}")
    return Fetched(200, resource)


def _account(account: Any) -> Fetched:
    return Fetched(200, {"sid": str(account.sid), "status": str(account.status)})


def unreadable(error: Exception) -> Fetched:
    """A 2xx the client could not read (not JSON, a list, a date of the wrong type: the
    client's parsing raises ValueError, AttributeError, TypeError, even RecursionError):
    an answer about the message, journaled as such, so its schedule moves on; not an
    outage to back off from, which would retry it for ever."""
    return Fetched(200, {}, None, f"unreadable answer: {type(error).__name__}: {error}"[:300])


def _refusal(status: int, code: int | None, message: str) -> CreateOutcome | _Retry:
    """What an HTTP error from Twilio means for a create: a 429 was not processed (retry),
    a 5xx may have been (unknown), any other status refused it."""
    if status == 429:
        return _Retry(Rejected(429, code, f"rate limited {MAX_ATTEMPTS} times: {message}"))
    if status >= 500:
        return Unknown(f"HTTP {status} from Twilio: {message}")
    return Rejected(status, code, message)


def fetch_error(status: object, code: object, message: str) -> FetchOutcome:
    """What an HTTP error from Twilio means for a fetch: the credentials are refused (401,
    403), Twilio could not answer now (429, 5xx), or it says something about the message."""
    if not isinstance(status, int):  # a problem body's own status field, not HTTP's
        return Throttled(f"error answer without a status: {message}")
    if status in (401, 403):
        return CredentialsRefused(status, _int_or_none(code), message)
    if status == 429 or status >= 500:
        kind = "rate limited" if status == 429 else "server error"
        return Throttled(f"{kind} (HTTP {status}): {message}", status)
    return Fetched(status, {}, _int_or_none(code), message)


@dataclass(frozen=True)
class _Retry:
    """Twilio certainly did not process the request; `give_up` is the outcome if retries
    run out."""

    give_up: Rejected


def _resource(message: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The named fields of Twilio's answer, JSON-serialisable (`from_` is kept as `from`)."""
    found = {name.rstrip("_"): getattr(message, name, None) for name in fields}
    return {k: _json_value(k, v) for k, v in found.items()}


def _json_value(name: str, value: Any) -> Any:
    if name == "error_code":  # the client leaves a code it cannot parse as a string
        return _int_or_none(value)
    return value.isoformat() if isinstance(value, dt.datetime) else value


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
