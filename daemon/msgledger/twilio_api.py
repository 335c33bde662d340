"""The Twilio REST API as msgledger uses it: the synchronous `twilio` client in worker
threads, under a concurrency limit, with the retry rules the record needs.

A create is retried only when Twilio certainly did not process it: a 429 (Twilio's own
words: "never processed and always safe to retry") or a connection that was never made.
When those retries run out the attempt is `Rejected`: certainly not sent.
A 5xx, a timeout or a dropped answer may have created the message, so it comes back as
`Unknown` and is never retried: retrying could send the message twice. The reconciler
settles those attempts later.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
import trio
import urllib3
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from .logs import get_logger

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
class TwilioConfig:
    account_sid: str
    auth_token: str
    base_url: str = "https://api.twilio.com"
    concurrency: int = 10  # requests in flight; Twilio answers 429 past the account's limit
    timeout: float = 15.0  # seconds per HTTP request
    backoff: float = 0.5  # seconds before the first retry; doubles, with full jitter
    rng: random.Random = field(default_factory=random.Random, compare=False)


class TwilioApi:
    """Calls the Messages API from worker threads, one client per thread."""

    def __init__(self, config: TwilioConfig) -> None:
        self._config = config
        self._limiter = trio.CapacityLimiter(config.concurrency)
        self._local = threading.local()

    def _client(self) -> Client:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            http = TwilioHttpClient(timeout=self._config.timeout)
            # A non-empty environment keeps TWILIO_EDGE/TWILIO_REGION from rewriting the
            # host (docs/twilio.md, "Pointing the twilio client at the simulator").
            client = Client(self._config.account_sid, self._config.auth_token,
                            http_client=http, environment={"MSGLEDGER": "1"})
            client.api.base_url = self._config.base_url
            self._local.client = client
        return client

    async def _call(self, fn: Callable[[Client], T]) -> T:
        return await trio.to_thread.run_sync(lambda: fn(self._client()), limiter=self._limiter)

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
            message = await self._call(lambda c: c.messages.create(**params))
        except TwilioRestException as e:
            return _refusal(e.status, e.code, str(e.msg))
        except TwilioServiceException as e:  # an RFC 9457 error body: its own status and code
            return _refusal(e.status, e.code, str(e.detail or e.title))
        except requests.exceptions.ConnectionError as e:
            if isinstance(e, requests.exceptions.ConnectTimeout) or _never_connected(e):
                return _Retry(Rejected(None, None, f"Twilio unreachable: {e}"))
            return Unknown(f"connection lost: {e}")
        except requests.exceptions.RequestException as e:
            return Unknown(f"{type(e).__name__}: {e}")
        return Accepted(message.sid, message.status, _resource(message))


def _refusal(status: int, code: int | None, message: str) -> CreateOutcome | _Retry:
    """What an HTTP error from Twilio means for a create: a 429 was not processed (retry),
    a 5xx may have been (unknown), any other status refused it."""
    if status == 429:
        return _Retry(Rejected(429, code, f"rate limited {MAX_ATTEMPTS} times: {message}"))
    if status >= 500:
        return Unknown(f"HTTP {status} from Twilio: {message}")
    return Rejected(status, code, message)


@dataclass(frozen=True)
class _Retry:
    """Twilio certainly did not process the request; `give_up` is the outcome if retries
    run out."""

    give_up: Rejected


def _never_connected(error: requests.exceptions.ConnectionError) -> bool:
    """True when the TCP connection itself failed (refused, unresolvable, connect timeout),
    so no byte of the request left. requests wraps urllib3's MaxRetryError, whose
    `reason` is the cause; NewConnectionError is a ConnectTimeoutError in urllib3 2."""
    wrapped = error.args[0] if error.args else None
    cause = getattr(wrapped, "reason", wrapped)
    return isinstance(cause, urllib3.exceptions.ConnectTimeoutError)


def _resource(message: Any) -> dict[str, Any]:
    """The parts of Twilio's answer worth keeping in the record."""
    fields = ("sid", "status", "to", "from_", "messaging_service_sid", "date_created",
              "date_sent", "num_segments", "error_code", "error_message", "price",
              "price_unit", "account_sid")
    found = {name.rstrip("_"): getattr(message, name, None) for name in fields}
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in found.items()}
