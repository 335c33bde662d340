"""The Messages API over HTTP: Basic auth, the fault knobs, routing, and Twilio's JSON.

Routes (docs/twilio.md, "The Messages API"), all under /2010-04-01/Accounts/{AccountSid}:
POST /Messages.json (create), GET /Messages.json (list), GET /Messages/{Sid}.json (fetch),
and GET /Accounts/{AccountSid}.json (the account: whether the credentials are taken).
Bulk Export's routes, under /v1/Exports, and its files' links take the same way in
(`_export_api.py`), as do a message's Media routes and their CDN links (`_media_api.py`).
POST /sim/inbound, the simulator's own, makes a customer text us (`_control.py`).
"""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Mapping, Sequence
from functools import partial
from urllib.parse import parse_qsl

import trio

from ._control import control_inbound, is_control
from ._export_api import download, is_download, is_export, route_exports
from ._http import DropConnection, Request, Response
from ._knobs import SimKnobs
from ._listing import page_json, parse_list_query, select_page, visible
from ._media_api import MEDIA_PATH, cdn, is_cdn, route_media
from ._simulator import Simulator
from ._store import NewMessage, is_valid_from, is_valid_to, utcnow
from ._wire import API_VERSION, ApiError, json_reply, message_json, not_found, redacts_to

_PATH = re.compile(
    rf"/{API_VERSION}/Accounts/(?P<account>[^/]+)/Messages(?:/(?P<sid>[^/]+))?\.json"
)
_ACCOUNT_PATH = re.compile(rf"/{API_VERSION}/Accounts/(?P<account>[^/]+)\.json")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_CHALLENGE = ("WWW-Authenticate", 'Basic realm="Twilio API"')


async def handle_api(sim: Simulator, request: Request) -> Response:
    """Answer one API request, or an export file's download, a CDN link or the control
    route (no auth, knobs or counting as a request); raises DropConnection when the
    lost-create knob fires."""
    if is_download(request.target):
        return download(sim, request.method, request.target)
    if is_cdn(request.target):
        return cdn(sim, request)
    if is_control(request.target):
        return await control_inbound(sim, request)
    knobs, stats, fetch = sim.knobs, sim.stats, _is_fetch(request)
    stats.requests += 1
    stats.fetches += fetch
    with stats.handling():
        await trio.sleep(knobs.latency + (knobs.fetch_latency if fetch else 0.0))
        try:
            return _route(sim, knobs, request)
        except ApiError as error:
            challenge = (_CHALLENGE,) if error.status == 401 else ()
            return json_reply(error.status, error.payload(), challenge)


def _is_fetch(request: Request) -> bool:
    match = _PATH.fullmatch(request.target.partition("?")[0])
    return request.method == "GET" and match is not None and match["sid"] is not None


def _route(sim: Simulator, knobs: SimKnobs, request: Request) -> Response:
    path, _, query = request.target.partition("?")
    _authenticate(knobs, request.headers.get("authorization", ""))
    if is_export(path):
        _refuse_if_throttled(sim, knobs)
        form = request.body if request.method == "POST" else query.encode()
        return route_exports(sim, request.method, path, _form(form))
    account = _ACCOUNT_PATH.fullmatch(path)
    if account is not None and request.method == "GET":
        return _account(knobs, account["account"])
    media = MEDIA_PATH.fullmatch(path)
    match = media or _PATH.fullmatch(path)
    if match is None:
        raise not_found(path)
    if match["account"] != knobs.account_sid:
        raise ApiError(401, 20003, "Authenticate")  # these credentials own no other account
    _refuse_if_throttled(sim, knobs)
    sid, method = match["sid"], request.method
    if media is not None:
        return route_media(sim, method, media, _form(query.encode()))
    if sid is None and method == "POST":
        return _create(sim, knobs, _pairs(request.body))
    if sid is None and method == "GET":
        return _list(sim, knobs, _form(query.encode()))
    if sid is not None and method == "GET":
        return _fetch(sim, knobs, sid, path)
    raise ApiError(405, 20004, "Method not allowed")


def _refuse_if_throttled(sim: Simulator, knobs: SimKnobs) -> None:
    """429 (nothing done) when a `throttle` burst or the rate_limit_429 knob takes it."""
    if sim.throttles_request() or sim.dice.chance(knobs.rate_limit_429):
        sim.stats.requests_429 += 1
        raise ApiError(429, 20429, "Too Many Requests")


def _account(knobs: SimKnobs, account: str) -> Response:
    """GET /Accounts/{Sid}.json: the account these credentials own, and no other."""
    if account != knobs.account_sid:
        raise ApiError(401, 20003, "Authenticate")
    return json_reply(200, {"sid": account, "status": "active", "type": "Full",
                             "friendly_name": "msgledger simulator"})


def _authenticate(knobs: SimKnobs, header: str) -> None:
    scheme, _, encoded = header.partition(" ")
    try:
        credentials = base64.b64decode(encoded, validate=True)
    except ValueError:
        credentials = b""
    expected = f"{knobs.account_sid}:{knobs.auth_token}".encode()
    if scheme.lower() != "basic" or not hmac.compare_digest(credentials, expected):
        raise ApiError(401, 20003, "Authenticate")


def _create(sim: Simulator, knobs: SimKnobs, pairs: Sequence[tuple[str, str]]) -> Response:
    media_urls = tuple(value for key, value in pairs if key == "MediaUrl")  # a repeated field
    message = sim.create(parse_new_message(dict(pairs), media_urls))
    if sim.dice.chance(knobs.lose_create_response):
        sim.stats.create_responses_lost += 1
        raise DropConnection  # the message exists and lives on; the client never hears of it
    # Redaction happens after transit, so the create answer still shows the full number.
    return json_reply(201, message_json(message, redact_to=False))


def _list(sim: Simulator, knobs: SimKnobs, params: Mapping[str, str]) -> Response:
    query, now = parse_list_query(params), utcnow()
    shown = visible(sim.messages.values(), knobs.list_lag, now)
    # With a lag, what is shown changes with the clock: no order can be kept.
    cached = None if knobs.list_lag > 0 else sim.list_cache.get(shown, query, sim.version)
    page = select_page(shown, query, cached)
    hidden = partial(redacts_to, knobs, now=now)
    return json_reply(200, page_json(knobs.account_sid, query, page, redact_to=hidden))


def _fetch(sim: Simulator, knobs: SimKnobs, sid: str, path: str) -> Response:
    """The message at once, whatever `list_lag` says."""
    message = sim.messages.get(sid)
    if message is None:
        sim.stats.fetches_not_found += 1
        raise not_found(path)
    return json_reply(200, message_json(message, redact_to=redacts_to(knobs, message, utcnow())))


def parse_new_message(form: Mapping[str, str], media_urls: Sequence[str] = ()) -> NewMessage:
    """Validate create parameters the way Twilio refuses them; other parameters are ignored.
    `media_urls`: every MediaUrl, which `form` holds only the last of."""
    to, from_ = form.get("To", ""), form.get("From") or None
    service, callback = form.get("MessagingServiceSid") or None, form.get("StatusCallback") or None
    if not to:
        raise ApiError(400, 21604, "A 'To' phone number is required.")
    if not is_valid_to(to):
        raise ApiError(400, 21211, f"The 'To' number {to} is not a valid phone number.")
    if from_ is None and service is None:
        raise ApiError(400, 21603, "A 'From' phone number is required.")
    if from_ is not None and not is_valid_from(from_):
        message = f"The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric sender ID."  # noqa: E501
        raise ApiError(400, 21212, message)
    if service is not None and not _SERVICE_SID.fullmatch(service):
        raise ApiError(400, 21705, "The Messaging Service Sid is invalid.")
    if not form.get("Body") and not form.get("MediaUrl") and not form.get("ContentSid"):
        raise ApiError(400, 21602, "Message body is required.")
    if callback is not None and not callback.startswith(("http://", "https://")):
        raise ApiError(400, 21609, f"The StatusCallback URL {callback} is not a valid URL.")
    return NewMessage(to, from_, service, form.get("Body", ""), callback, tuple(media_urls))


def _form(encoded: bytes) -> dict[str, str]:
    return dict(_pairs(encoded))


def _pairs(encoded: bytes) -> list[tuple[str, str]]:
    return parse_qsl(encoded.decode("utf-8", "replace"), keep_blank_values=True)


