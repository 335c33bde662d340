"""Signed status callbacks: their form parameters, signature, and delivery over HTTP.

Delivery follows Twilio's connection overrides (docs/twilio.md, "Callback retries"): the
`#ct=…&rt=…&tt=…&rc=…&rp=…` fragment of the callback URL tunes timeouts and retries, and is
stripped before the request is sent and signed. With no fragment: one retry, on connection
failure only. Retries and duplicates of one callback carry the same
`I-Twilio-Idempotency-Token`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl

import httpx
import trio
from twilio.request_validator import RequestValidator

from ._store import SimMessage
from ._wire import API_VERSION

CLOSE_TIMEOUT = 2.0  # seconds to close pooled connections on shutdown before giving up
# Concurrent callback POSTs. httpcore's pool does work per queued request on every change, so
# callbacks queued in it ran slower than the same queued on a semaphore in front of it
# (bench/README.md, "Measured once"); 16 keeps busy a receiver that takes a few ms (a group
# commit).
MAX_IN_FLIGHT = 16
_RECEIPT_STATUSES = ("delivered", "undelivered")


@dataclass(frozen=True)
class Callback:
    """One signed status callback, ready to post (and to post again, identically)."""

    url: str  # as given in StatusCallback, fragment included
    params: dict[str, str]
    signature: str  # X-Twilio-Signature over the URL without its fragment
    idempotency_token: str


@dataclass(frozen=True)
class DeliveryReport:
    """What delivering one callback took."""

    attempts: int
    delivered: bool  # some attempt was answered 2xx


Deliver = Callable[[Callback], Awaitable[DeliveryReport]]


@dataclass(frozen=True)
class Overrides:
    """Twilio's webhook connection overrides, with Twilio's defaults."""

    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    total_timeout: float = 15.0
    retry_count: int = 1
    retry_policy: frozenset[str] = frozenset({"ct"})

    @classmethod
    def parse(cls, fragment: str) -> Overrides:
        """Read `ct`, `rt`, `tt` (ms), `rc` and `rp`; out-of-range or garbled values are clamped
        or ignored, since Twilio would not refuse the message over them."""
        given = dict(parse_qsl(fragment))
        default = cls()
        policy = given.get("rp")
        return cls(
            connect_timeout=_millis(given.get("ct"), 100, 10_000, default.connect_timeout),
            read_timeout=_millis(given.get("rt"), 100, 15_000, default.read_timeout),
            total_timeout=_millis(given.get("tt"), 100, 15_000, default.total_timeout),
            retry_count=int(_clamp(given.get("rc"), 0, 5, default.retry_count)),
            retry_policy=default.retry_policy if policy is None else frozenset(policy.split(",")),
        )

    def retries(self, failure: str) -> bool:
        return failure in self.retry_policy or "all" in self.retry_policy


def _clamp(value: str | None, low: float, high: float, default: float) -> float:
    if value is None or not value.isdigit():
        return default
    return min(max(float(value), low), high)


def _millis(value: str | None, low: float, high: float, default: float) -> float:
    return _clamp(value, low, high, default * 1000) / 1000


def callback_params(message: SimMessage) -> dict[str, str]:
    """The form parameters of a status callback for the message's current status
    (docs/twilio.md, "Status callback parameters")."""
    params = {
        "MessageSid": message.sid,
        "SmsSid": message.sid,
        "MessageStatus": message.status,
        "SmsStatus": message.status,
        "AccountSid": message.account_sid,
        "From": message.from_ or "",
        "To": message.to,
        "ApiVersion": API_VERSION,
    }
    if message.messaging_service_sid:
        params["MessagingServiceSid"] = message.messaging_service_sid
    if message.error_code is not None:
        params["ErrorCode"] = str(message.error_code)
    if message.is_whatsapp:
        params["ChannelPrefix"] = "whatsapp"
    elif message.status in _RECEIPT_STATUSES:
        params["RawDlrDoneDate"] = message.date_updated.strftime("%y%m%d%H%M")
    if message.status == "read":
        params["EventType"] = "READ"
    return params


def build_callback(message: SimMessage, url: str, auth_token: str, token: str) -> Callback:
    """Sign the message's callback: the fragment is no part of the signed URL
    (docs/twilio.md, "Callback retries")."""
    params = callback_params(message)
    signed_url = url.partition("#")[0]
    signature = str(RequestValidator(auth_token).compute_signature(signed_url, params))
    return Callback(url=url, params=params, signature=signature, idempotency_token=token)


class CallbackSender:
    """Posts callbacks through one pooled HTTP client, retrying as the overrides say."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)

    async def deliver(self, callback: Callback) -> DeliveryReport:
        url, _, fragment = callback.url.partition("#")
        overrides = Overrides.parse(fragment)
        attempts = 0
        with trio.move_on_after(overrides.total_timeout):
            while attempts <= overrides.retry_count:
                attempts += 1
                failure = await self._attempt(url, callback, overrides)
                if failure is None:
                    return DeliveryReport(attempts=attempts, delivered=True)
                if not overrides.retries(failure):
                    break
        return DeliveryReport(attempts=attempts, delivered=False)

    async def _attempt(self, url: str, callback: Callback, overrides: Overrides) -> str | None:
        """Post once; None on a 2xx, else the failure kind as `rp` names it (or "other")."""
        timeout = httpx.Timeout(
            overrides.read_timeout, connect=overrides.connect_timeout, pool=None
        )
        headers = {
            "X-Twilio-Signature": callback.signature,
            "I-Twilio-Idempotency-Token": callback.idempotency_token,
            "User-Agent": "TwilioProxy/1.1",
        }
        try:
            async with self._slots:
                response = await self._client.post(
                    url, data=callback.params, headers=headers, timeout=timeout
                )
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return "ct"
        except httpx.ReadTimeout:
            return "rt"
        except httpx.TransportError:
            return "other"  # e.g. a partial response, which Twilio does not retry
        return _failure_kind(response.status_code)


def _failure_kind(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 400 <= status < 600:
        return f"{status // 100}xx"
    return "other"


@asynccontextmanager
async def open_callback_sender() -> AsyncIterator[Deliver]:
    """A `deliver` function backed by a pooled client, closed (bounded, shielded) on exit."""
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    client = httpx.AsyncClient(limits=limits, trust_env=False)  # no proxies for callbacks
    try:
        yield CallbackSender(client).deliver
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await client.aclose()
