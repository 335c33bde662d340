"""Texts received from customers: the signed webhook Twilio posts to our number's URL, the
fallback URL it tries when that fails, and the replies the TwiML answer asks for.

The webhook's parameters and fallback follow
https://www.twilio.com/docs/messaging/guides/webhook-request: MessageSid (MM when it
carries media), SmsSid and SmsMessageSid alike, MediaUrl{N} on the simulator's own media
route, SmsStatus=received. A failure is a connect error or timeout, an answer outside 2xx,
or one that is not a TwiML `<Response>`; the fallback then gets the same parameters plus
ErrorCode (11200, 11205 for a timeout, 12100 for a document that does not parse) and
ErrorUrl, signed for its own URL. Nothing is retried: Twilio's answer to a failing webhook
is the fallback (docs/simulator.md, "What it does not do").
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

import httpx
import trio
from twilio.request_validator import RequestValidator

from ._callbacks import CLOSE_TIMEOUT
from ._media import MAX_MEDIA, media_path
from ._store import NewMessage, SimMessage, is_valid_to
from ._twiml import TwimlError, parse_response, replies_of
from ._wire import API_VERSION

if TYPE_CHECKING:
    from ._simulator import Simulator

HTTP_FAILURE, TIMEOUT, PARSE_FAILURE = 11200, 11205, 12100  # Twilio's error codes
_MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-fA-F]{32}")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_SHORT_CODE = re.compile(r"[0-9]{3,8}")


@dataclass(frozen=True)
class NewInbound:
    """A text a customer sends to one of our numbers; ValueError if it could not be one."""

    from_: str  # the customer
    to: str  # our Twilio number
    body: str
    media: tuple[tuple[str, bytes], ...] = ()  # (content type, bytes) of each file
    messaging_service_sid: str | None = None  # when our number belongs to a service
    replied_to: str | None = None  # the SID of our message this one replies to
    extra: Mapping[str, str] = field(default_factory=dict)  # more parameters, as they are
    deliver: bool = True  # False: stored, listed and exported, but the webhook is lost

    def __post_init__(self) -> None:
        if not _is_number(self.from_) or not _is_number(self.to):
            raise ValueError(f"not phone numbers: from {self.from_!r} to {self.to!r}")
        if len(self.media) > MAX_MEDIA or not all(kind for kind, _ in self.media):
            raise ValueError(f"at most {MAX_MEDIA} media files, each with a content type")
        if self.replied_to is not None and not _MESSAGE_SID.fullmatch(self.replied_to):
            raise ValueError(f"replied_to must be a message SID: {self.replied_to!r}")
        service = self.messaging_service_sid
        if service is not None and not _SERVICE_SID.fullmatch(service):
            raise ValueError(f"messaging_service_sid must be MG + 32 hex: {service!r}")


def _is_number(text: str) -> bool:
    """E.164 (perhaps behind whatsapp:) or a short code: what can send or take a text."""
    return is_valid_to(text) or _SHORT_CODE.fullmatch(text) is not None


@dataclass(frozen=True)
class InboundReport:
    """What receiving one text took."""

    sid: str
    answered_by: str | None  # "primary", "fallback", or None (both failed, or not delivered)
    primary_status: int | None  # the HTTP status each URL answered, None if none did
    fallback_status: int | None
    twiml: str | None  # the answer whose TwiML was used
    reply_sids: tuple[str, ...]
    errors: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class _Attempt:
    """One webhook POST: its answer, and the TwiML in it unless it failed."""

    status: int | None
    text: str | None
    root: Element | None = None  # the <Response>; None when this attempt failed
    error_code: int | None = None
    error: str | None = None


async def receive(sim: Simulator, inbound: NewInbound) -> InboundReport:
    """`Simulator.receive_inbound`: store, post, fall back, reply."""
    knobs = sim.knobs  # one reading for the whole exchange
    if inbound.deliver and knobs.inbound_url is None:
        raise ValueError("no inbound_url is set: the text has nowhere to go")
    message = sim.store_inbound(inbound)
    if not inbound.deliver or knobs.inbound_url is None:
        return InboundReport(message.sid, None, None, None, None, (), ())
    params = webhook_params(message, sim.base_url, inbound, _original_sender(sim, inbound))
    primary_url = knobs.inbound_url.partition("#")[0]
    fallback: _Attempt | None = None
    async with _open_client() as client:
        post = _Poster(client, knobs.auth_token, knobs.inbound_timeout, sim.dice.token())
        primary = await post(primary_url, params)
        sim.stats.inbound_sent += 1
        if primary.root is None and knobs.inbound_fallback_url:
            sim.stats.inbound_fallbacks += 1
            failed = {"ErrorCode": str(primary.error_code), "ErrorUrl": primary_url}
            fallback = await post(knobs.inbound_fallback_url.partition("#")[0],
                                  {**params, **failed})
    return _execute(sim, message, inbound, primary, fallback)


def webhook_params(message: SimMessage, base_url: str, inbound: NewInbound,
                   original_sender: str) -> dict[str, str]:
    """The form Twilio posts for a received text, `inbound.extra` last."""
    sid, account = message.sid, message.account_sid
    params = {
        "MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": account,
        "From": message.from_ or "", "To": message.to, "Body": message.body,
        "NumMedia": str(len(message.media)), "NumSegments": message.num_segments,
        "SmsStatus": "received", "ApiVersion": API_VERSION,
    }
    if message.messaging_service_sid:
        params["MessagingServiceSid"] = message.messaging_service_sid
    for n, media in enumerate(message.media):
        params[f"MediaUrl{n}"] = base_url + media_path(account, sid, media.sid)
        params[f"MediaContentType{n}"] = media.content_type
    if inbound.replied_to is not None:
        params["OriginalRepliedMessageSid"] = inbound.replied_to
        params["OriginalRepliedMessageSender"] = original_sender
    return params | dict(inbound.extra)


def _original_sender(sim: Simulator, inbound: NewInbound) -> str:
    """Who sent the message replied to: its `from`, else (unknown here) our number."""
    original = sim.messages.get(inbound.replied_to or "")
    return (original.from_ if original else None) or inbound.to


@asynccontextmanager
async def _open_client() -> AsyncIterator[httpx.AsyncClient]:
    client = httpx.AsyncClient(trust_env=False)  # no proxies: the app is on loopback
    try:
        yield client
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await client.aclose()


class _Poster:
    """Posts the signed webhook to a URL, all within `timeout` seconds."""

    def __init__(self, client: httpx.AsyncClient, auth_token: str, timeout: float,
                 idempotency_token: str) -> None:
        self._client = client
        self._validator = RequestValidator(auth_token)
        self._timeout = timeout
        self._token = idempotency_token  # one per text: the fallback is the same delivery

    async def __call__(self, url: str, params: Mapping[str, str]) -> _Attempt:
        headers = {"X-Twilio-Signature": self._validator.compute_signature(url, params),
                   "I-Twilio-Idempotency-Token": self._token, "User-Agent": "TwilioProxy/1.1"}
        response = None
        with trio.move_on_after(self._timeout):  # the whole exchange, not each read
            try:
                response = await self._client.post(url, data=dict(params), headers=headers,
                                                   timeout=httpx.Timeout(self._timeout))
            except httpx.TimeoutException:
                pass
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                return _Attempt(None, None, error_code=HTTP_FAILURE,
                                error=f"{type(error).__name__}: {error}")
        if response is None:
            return _Attempt(None, None, error_code=TIMEOUT,
                            error=f"no answer within {self._timeout:g} s")
        return _read_answer(response)


def _read_answer(response: httpx.Response) -> _Attempt:
    status, text = response.status_code, response.text
    if not 200 <= status < 300:
        return _Attempt(status, text, error_code=HTTP_FAILURE, error=f"answered HTTP {status}")
    try:
        return _Attempt(status, text, parse_response(response.content))
    except TwimlError as error:
        return _Attempt(status, text, error_code=PARSE_FAILURE, error=str(error))


def _execute(sim: Simulator, message: SimMessage, inbound: NewInbound, primary: _Attempt,
             fallback: _Attempt | None) -> InboundReport:
    """Send the replies of the first answer that was TwiML, and report."""
    errors = [f"{name}: {attempt.error}" for name, attempt in
              (("primary", primary), ("fallback", fallback)) if attempt and attempt.error]
    if fallback is None and primary.root is None:
        errors.append("no inbound_fallback_url to fall back on")
    answered_by, used = _answered(primary, fallback)
    reply_sids: list[str] = []
    if used is not None and used.root is not None:
        replies, skipped = replies_of(used.root, sender=inbound.from_, number=inbound.to)
        errors += skipped
        reply_sids = [sim.reply(NewMessage(r.to, r.from_, inbound.messaging_service_sid,
                                           r.body, r.status_callback, r.media_urls)).sid
                      for r in replies]
    return InboundReport(
        sid=message.sid, answered_by=answered_by, primary_status=primary.status,
        fallback_status=None if fallback is None else fallback.status,
        twiml=None if used is None else used.text, reply_sids=tuple(reply_sids),
        errors=tuple(errors))


def _answered(primary: _Attempt, fallback: _Attempt | None) -> tuple[str | None, _Attempt | None]:
    """Which URL answered with TwiML, and its attempt."""
    if primary.root is not None:
        return "primary", primary
    if fallback is not None and fallback.root is not None:
        return "fallback", fallback
    return None, None
