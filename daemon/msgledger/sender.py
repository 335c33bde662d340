"""The outbound path: record before acting, then send, then record the outcome.

`send_requested` is journaled before the Twilio API is called, so even a send whose answer
is lost stays in the record; the outcome follows as `send_accepted` (SID and initial
status), `send_rejected` (Twilio's error: an unsuccessful attempt is part of the record)
or `send_unknown` (the request left but no answer came back). The StatusCallback URL
carries our `ref`, so callbacks find their send even before its SID is journaled.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import trio

from .events import Event, JournalUnavailable, utc_now
from .journal_client import JournalClient
from .logs import get_logger
from .twilio_api import Accepted, CreateOutcome, Rejected, TwilioApi, Unknown

log = get_logger("msgledger.sender")

# Twilio's connection overrides on every StatusCallback we set (docs/twilio.md, "Callback
# retries"): by default Twilio retries a callback once and only when the connection failed,
# so a 503 (journal not durable) or a read timeout would lose that callback for good. Not
# part of the signed URL.
CALLBACK_OVERRIDES = "rc=3&rp=ct,rt,5xx"


@dataclass(frozen=True)
class SendRequest:
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    ref: str
    media_urls: tuple[str, ...] = ()  # Twilio's MediaUrl: fetched by Twilio, kept by us


SendResult = Literal["accepted", "rejected", "unknown", "not_journaled", "outcome_not_journaled"]


class Sender:
    """Sends one message at a time per caller; the Twilio client bounds the concurrency."""

    def __init__(self, journal: JournalClient, api: TwilioApi | None, *, keep_body: str,
                 public_url: Callable[[], str], keep_media: str = "full") -> None:
        self._journal_client = journal
        self._api = api
        self._keep_body = keep_body
        self._keep_media = keep_media
        self._public_url = public_url
        self._in_flight: set[str] = set()  # refs being sent right now

    @property
    def configured(self) -> bool:
        return self._api is not None

    def claim(self, ref: str) -> bool:
        """Reserve `ref` for one send; False if another request is sending it right now.

        Synchronous, so it settles a race before the caller's first `await`.
        """
        if ref in self._in_flight:
            return False
        self._in_flight.add(ref)
        return True

    def release(self, ref: str) -> None:
        self._in_flight.discard(ref)

    def status_callback(self, ref: str) -> str:
        return status_callback_url(self._public_url(), ref)

    async def send(self, request: SendRequest) -> SendResult:
        """Journal the request, call Twilio, journal the outcome."""
        assert self._api is not None, "check `configured` first"
        requested = Event("send_requested", "api", utc_now(), ref=request.ref,
                          status="requested", data=self._requested_data(request))
        if not await self._journal(requested):
            return "not_journaled"  # nothing was sent
        try:
            outcome: CreateOutcome = await self._api.create_message(self._create_params(request))
        except trio.Cancelled:  # shutdown cut the send short: say so in the record
            await self._journal(_outcome_event(request.ref, Unknown("cancelled at shutdown")))
            raise
        if not await self._journal(_outcome_event(request.ref, outcome)):
            log.error("send_outcome_not_journaled", ref=request.ref, outcome=repr(outcome))
            return "outcome_not_journaled"
        log.info("send_journaled", ref=request.ref, outcome=type(outcome).__name__.lower(),
                 sid=getattr(outcome, "sid", None))
        return _RESULT[type(outcome)]

    async def _journal(self, event: Event) -> bool:
        """Journal `event`, waiting at most the ack timeout. Shielded: once Twilio may have
        acted, a shutdown must not keep its answer out of the record."""
        ack = await self._journal_client.journal_shielded(event)
        return not isinstance(ack, JournalUnavailable)

    def _requested_data(self, request: SendRequest) -> dict[str, Any]:
        return {"to": request.to, "from": request.from_,
                "messaging_service_sid": request.messaging_service_sid,
                "status_callback": self.status_callback(request.ref),
                **body_fields(request.body, self._keep_body),
                **media_fields(request.media_urls, self._keep_media)}

    def _create_params(self, request: SendRequest) -> dict[str, Any]:
        params: dict[str, Any] = {"to": request.to, "body": request.body,
                                  "status_callback": self.status_callback(request.ref)}
        if request.from_:
            params["from_"] = request.from_
        if request.messaging_service_sid:
            params["messaging_service_sid"] = request.messaging_service_sid
        if request.media_urls:
            params["media_url"] = list(request.media_urls)
        return params


def new_ref() -> str:
    """A ref of msgledger's own making, for a send that was given none."""
    return "ml-" + secrets.token_hex(12)


def status_callback_url(public_url: str, ref: str) -> str:
    """Where Twilio reports the statuses of the message sent as `ref`."""
    return f"{public_url}/twilio/status?ref={quote(ref, safe='')}#{CALLBACK_OVERRIDES}"


def media_fields(urls: tuple[str, ...] | list[str], keep_media: str) -> dict[str, Any]:
    """A send's media as journaled: the URLs given, and each file pending for the media
    fetcher, which takes it from Twilio's copy once the message has a SID (`unfetched`
    with `store.keep_media = none`: no fetcher runs)."""
    if not urls:
        return {}
    state = "unfetched" if keep_media == "none" else "pending"
    return {"media_url": list(urls),
            "media": [{"n": n, "url": url, "state": state} for n, url in enumerate(urls)]}


def body_fields(body: str, keep_body: str) -> dict[str, Any]:
    """What `store.keep_body` lets the record keep of a body; its SHA-256 always."""
    fields: dict[str, Any] = {"body_sha256": hashlib.sha256(body.encode()).hexdigest()}
    if keep_body == "full":
        fields["body"] = body
    if keep_body in ("full", "hash"):
        fields["body_length"] = len(body)
    return fields


_RESULT: dict[type, SendResult] = {Accepted: "accepted", Rejected: "rejected", Unknown: "unknown"}


def _outcome_event(ref: str, outcome: CreateOutcome) -> Event:
    at = utc_now()
    if isinstance(outcome, Accepted):
        return Event("send_accepted", "api", at, sid=outcome.sid, ref=ref,
                     status=outcome.status, data=dict(outcome.resource))
    if isinstance(outcome, Rejected):
        return Event("send_rejected", "api", at, ref=ref, status="rejected", data={
            "http_status": outcome.http_status, "error_code": outcome.error_code,
            "error_message": outcome.error_message})
    return Event("send_unknown", "api", at, ref=ref, status="outcome_unknown",
                 data={"reason": outcome.reason, "attempts": outcome.attempts})
