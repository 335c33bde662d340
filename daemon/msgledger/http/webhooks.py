"""The webhook receiver: `POST /twilio/status`, `/twilio/inbound` and `/twilio/debugger`.

A lean ASGI path in front of Quart, because this is the hot route and Quart's request
object and form parsing were a large share of its cost, which `parse_qsl` does in a
fraction (docs/design.md, "Why the webhook path bypasses Quart"). The order of checks is
the contract:
size (413) -> content type (415) -> signature (403, nothing journaled) -> required fields
(400) -> journal -> 200 only once the event is committed, 503 if not within `ack_timeout`.
An inbound message's 200 carries TwiML (`inbound/answer.py`): never plain text, which
Twilio could send back to the sender as an SMS.
Anything else that goes wrong is answered 500, counted and logged (`callback_failed`), like
every other outcome: no request escapes to hypercorn unanswered by us. Each line names the
client, the path and the user agent; the event keeps the client (docs/clients.md).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, parse_qsl

from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import HTTPScope as Scope

from ..events import Event, JournalUnavailable, utc_now
from ..inbound.answer import InboundAnswer
from ..inbound.forward import FirmApp
from ..inbound.receipt import ReceiptRules, inbound_event
from ..journal_client import JournalClient
from ..logs import get_logger
from ..metrics import Metrics
from ..settings import Settings
from .clients import ClientResolver, user_agent_of
from .signature import SignatureChecker, host_respelled
from .state import ServerState

SID = re.compile(r"(SM|MM)[0-9a-fA-F]{32}")  # a message SID, as Twilio makes them
# A ref of this shape could be taken for a SID (GET /v1/messages/{key} tries both), so no
# ref may have it; any case, so no lookup that folds case could ever mix the two up.
SID_SHAPED = re.compile(r"(?i:SM|MM)[0-9a-fA-F]{32}")
MAX_FORM_FIELDS = 200  # Twilio sends about 15; more is abuse, not a callback
FORM_TYPE = b"application/x-www-form-urlencoded"
# Headers kept with each event: Twilio's own (the signature lets an auditor re-check the
# callback later; the idempotency token tells retries apart) and the user agent.
KEPT_HEADER_PREFIXES = (b"x-twilio-", b"i-twilio-", b"user-agent")

log = get_logger("msgledger.webhooks")


@dataclass(frozen=True)
class Route:
    name: str  # "status" | "inbound" | "debugger", the metrics label
    required: tuple[str, ...]  # form fields without which the request is 400


ROUTES = {
    "/twilio/status": Route("status", ("MessageSid", "MessageStatus")),
    "/twilio/inbound": Route("inbound", ("MessageSid",)),
    "/twilio/debugger": Route("debugger", ("Sid",)),
}


@dataclass(frozen=True)
class Outcome:
    http_status: int
    reason: str
    event: Event | None = None
    seq: int | None = None
    error: str | None = None  # the type of an unexpected exception: answered 500
    twiml: bytes | None = None  # an inbound message's answer


class Refused(Exception):
    """The request is answered with `http_status` and nothing is journaled."""

    def __init__(self, http_status: int, reason: str) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.reason = reason


class WebhookReceiver:
    """ASGI app for the two webhook routes; everything it accepts is on disk."""

    def __init__(self, journal: JournalClient, checker: SignatureChecker, *,
                 state: ServerState, max_body: int, metrics: Metrics,
                 clients: ClientResolver | None = None,
                 inbound: tuple[ReceiptRules, InboundAnswer] | None = None) -> None:
        self.journal = journal  # each wait for the journal is bounded by http.ack_timeout
        self.checker = checker
        self.state = state  # its public_url is known once the listener is bound
        self.max_body = max_body
        self.metrics = metrics
        self.clients = clients or ClientResolver(())  # no proxies trusted: the peer
        self.inbound = inbound  # webhook_receiver always gives one; a bare receiver lacks it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES[scope["path"]]
        started = time.perf_counter()
        headers = headers_of(scope)
        client = self.clients.client(scope)
        try:
            outcome = await self._handle(route, scope, headers, client, receive)
        except Refused as refused:
            outcome = Outcome(refused.http_status, refused.reason)
        except Exception as error:  # a bug of ours or the server's; trio.Cancelled passes
            outcome = Outcome(500, "internal error", error=type(error).__name__)
        try:  # a 405 says what is allowed, as RFC 9110 asks
            await respond(send, outcome.http_status, outcome.reason,
                          allow="POST" if outcome.http_status == 405 else None,
                          twiml=outcome.twiml)
        finally:  # counted even if the answer cannot be sent: the outcome stands
            self._account(route, outcome, time.perf_counter() - started,
                          {"client": client, "path": scope["path"],
                           "user_agent": user_agent_of(headers.get(b"user-agent"))})

    async def _handle(self, route: Route, scope: Scope, headers: Mapping[bytes, bytes],
                      client: str, receive: Receive) -> Outcome:
        if scope["method"] != "POST":
            raise Refused(405, "method not allowed")
        body = await read_body(receive, headers, self.max_body)
        if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != FORM_TYPE:
            raise Refused(415, "expected application/x-www-form-urlencoded")
        pairs = _parse_form(body)
        signature = headers.get(b"x-twilio-signature")
        if signature is None:
            raise Refused(403, "missing X-Twilio-Signature")
        url = self._signed_url(self._url(scope), headers, pairs, signature.decode("latin-1"))
        form = _form_of(route, pairs)
        data = _data(url, pairs, headers, client)
        if route.name == "inbound":
            return await self._inbound(pairs, form, data)
        return await self._journal(_event(route, scope, form, data))

    async def _inbound(self, pairs: list[tuple[str, str]], form: Mapping[str, str],
                       data: dict[str, Any]) -> Outcome:
        """Journal the message, then answer Twilio (the app's TwiML, or an empty one)."""
        assert self.inbound is not None, "webhook_receiver gives every receiver one"
        rules, answer = self.inbound
        outcome = await self._journal(inbound_event(pairs, form, rules, data))
        if outcome.http_status != 200 or outcome.event is None:
            return outcome
        twiml = await answer.answer(outcome.event, pairs, form)
        return Outcome(200, outcome.reason, outcome.event, outcome.seq, twiml=twiml)

    def _signed_url(self, url: str, headers: Mapping[bytes, bytes],
                    pairs: list[tuple[str, str]], signature: str) -> str:
        """The URL `signature` is over: `url`, or failing that `url` with its host spelled
        as the Host header spells it (Twilio signs the URL as typed in its console); else
        Refused(403). The second HMAC only when the first fails, as ports are tried."""
        raw = headers.get(b"x-twilio-webhooks-signature-settings")
        settings = raw.decode("latin-1") if raw else None
        if self.checker.check(url, pairs, signature, settings):
            return url
        host = headers.get(b"host")
        respelled = host_respelled(url, host.decode("latin-1")) if host else None
        if respelled is not None and self.checker.check(respelled, pairs, signature, settings):
            return respelled  # kept with the event: the URL the signature can be re-checked on
        raise Refused(403, "signature does not match")

    def _url(self, scope: Scope) -> str:
        """The URL Twilio requested: the public base plus the path and query as sent."""
        query = scope.get("query_string", b"")
        path = scope.get("raw_path") or scope["path"].encode()
        return f"{self.state.public_url}{path.decode('latin-1')}" + (
            f"?{query.decode('latin-1')}" if query else "")

    async def _journal(self, event: Event) -> Outcome:
        ack = await self.journal.journal(event)
        if isinstance(ack, JournalUnavailable):
            return Outcome(503, str(ack), event)
        return Outcome(200, "journaled", event, ack)

    def _account(self, route: Route, outcome: Outcome, seconds: float,
                 caller: dict[str, str | None]) -> None:
        self.metrics.callbacks.labels(route.name, str(outcome.http_status)).inc()
        event = outcome.event
        fields = {"route": route.name, "http_status": outcome.http_status,
                  "ms": round(seconds * 1000, 3), **caller}
        if event is not None:
            fields.update(sid=event.sid, ref=event.ref, status=event.status, seq=outcome.seq)
        if outcome.http_status == 200:
            log.info("callback_journaled", **fields)
        elif outcome.error is not None:
            log.error("callback_failed", error=outcome.error, **fields)
        else:
            log.warning("callback_refused", reason=outcome.reason, **fields)


def webhook_receiver(settings: Settings, journal: JournalClient, *, state: ServerState,
                     metrics: Metrics) -> WebhookReceiver | None:
    """The receiver `settings` ask for, or None when webhooks are off."""
    if not settings.http_webhooks:
        return None
    assert settings.twilio_auth_token, "settings refuse webhooks without an auth token"
    checker = SignatureChecker(settings.twilio_auth_token)
    app = None if settings.inbound_forward_url is None else FirmApp(
        settings.inbound_forward_url, settings.inbound_forward_timeout, checker)
    answer = InboundAnswer(app, journal, keep_body=settings.store_keep_body,
                           keep_media=settings.store_keep_media,
                           public_url=lambda: str(state.public_url), metrics=metrics)
    rules = ReceiptRules(settings.store_keep_body, settings.store_keep_media,
                         settings.twilio_api_base_url)
    return WebhookReceiver(journal, checker, state=state,
                           max_body=settings.http_max_body_bytes, metrics=metrics,
                           clients=ClientResolver(settings.http_trusted_proxies),
                           inbound=(rules, answer))


def headers_of(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope["headers"]}


async def read_body(receive: Receive, headers: Mapping[bytes, bytes], limit: int) -> bytes:
    """The body, or Refused(413) as soon as it is known to exceed `limit`."""
    declared = headers.get(b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refused(413, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = cast(dict[str, Any], await receive())
        if message["type"] == "http.disconnect":
            raise Refused(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse_form(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                         max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as e:
        raise Refused(400, f"malformed form body: {e}") from e


def _form_of(route: Route, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The first value of each field; Refused(400) unless the route's own are there."""
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    missing = [name for name in route.required if not form.get(name)]
    if missing:
        raise Refused(400, f"missing {', '.join(missing)}")
    return form


def _data(url: str, pairs: list[tuple[str, str]], headers: Mapping[bytes, bytes],
          client: str) -> dict[str, Any]:
    """What every webhook event keeps: the form (as JSON arrays), the signed URL, Twilio's
    headers and the client."""
    return {"params": pairs, "url": url, "headers": {
        k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()
        if k.startswith(KEPT_HEADER_PREFIXES)}, "client": client}


def _event(route: Route, scope: Scope, form: Mapping[str, str], data: dict[str, Any]) -> Event:
    query = scope.get("query_string", b"")
    ref = parse_qs(query.decode("latin-1")).get("ref", [None])[0] if query else None
    if ref is not None and SID_SHAPED.fullmatch(ref):
        # Our StatusCallback URLs never carry such a ref (`/v1` refuses them); a URL set by
        # someone else might. The event is kept (URL and all) but links by its SID alone,
        # so no ref can ever be looked up as, or in place of, a SID.
        ref = None
    if route.name == "status":
        return Event("callback", "callback", utc_now(), sid=form["MessageSid"], ref=ref,
                     status=form["MessageStatus"], data=data)
    return Event("debugger", "debugger", utc_now(), sid=_debugger_sid(form), ref=ref, data=data)


def _debugger_sid(form: Mapping[str, str]) -> str | None:
    """The message an alert is about, when its Payload names one (its `resource_sid`, in
    Twilio's Debugger webhook). A Payload that is not JSON, or names something that is not
    a message SID, links nothing: the alert is journaled on its own, its Payload verbatim
    in the params."""
    try:
        payload = json.loads(form.get("Payload", ""))
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's limit
        return None
    sid = payload.get("resource_sid") if isinstance(payload, dict) else None
    return sid if isinstance(sid, str) and SID.fullmatch(sid) else None


async def respond(send: Send, status: int, reason: str, *, allow: str | None = None,
                  twiml: bytes | None = None) -> None:
    """`twiml` (text/xml) or empty for 200, else `{"error": reason}`; `allow` is a 405's
    Allow header."""
    body = twiml if twiml is not None else (
        b"" if status == 200 else json.dumps({"error": reason}).encode())
    headers = [(b"content-length", str(len(body)).encode())]
    if twiml is not None:
        headers.append((b"content-type", b"text/xml; charset=utf-8"))
    elif body:
        headers.append((b"content-type", b"application/json"))
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers,
                "trailers": False})
    await send({"type": "http.response.body", "body": body, "more_body": False})
