"""The Media subresource over HTTP, and the CDN its files are served from.

Routes (https://www.twilio.com/docs/messaging/api/media-resource), behind the Messages API's
Basic auth, latency and 429 knobs, under /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}:
GET /Media.json (the message's files, one page), GET /Media/{MediaSid}.json (one file's
resource), GET /Media/{MediaSid} (307 to a CDN link for the file itself). And, with no auth,
GET /cdn/{token}: the file, unless the request carries credentials. A real CDN link is a
signed storage URL that refuses a second way of authenticating, and a client that follows
the 307 with its Basic auth still on (same host here, so many would) must be caught.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._http import Request, Response
from ._media import CDN_PREFIX, media_json, media_page_json
from ._simulator import Simulator
from ._store import SimMedia, SimMessage
from ._wire import API_VERSION, ApiError, json_reply, not_found

MEDIA_PATH = re.compile(
    rf"/{API_VERSION}/Accounts/(?P<account>[^/]+)/Messages/(?P<sid>[^/]+)/Media"
    r"(?:/(?P<media>[^/.]+))?(?P<json>\.json)?"
)


def is_cdn(target: str) -> bool:
    return target.startswith(CDN_PREFIX)


def route_media(sim: Simulator, method: str, match: re.Match[str],
                params: Mapping[str, str]) -> Response:
    """Answer one authenticated media request (`match`: of MEDIA_PATH, account checked)."""
    if method != "GET":
        raise ApiError(405, 20004, "Method not allowed")
    message = sim.messages.get(match["sid"])
    if message is None:
        raise not_found(match.string)
    if match["media"] is None:
        if match["json"] is None:
            raise not_found(match.string)
        return json_reply(200, media_page_json(message, params))
    media = _find(message, match["media"], match.string)
    if match["json"] is not None:
        return json_reply(200, media_json(message, media))
    sim.stats.media_fetches += 1
    location = sim.base_url + CDN_PREFIX + sim.cdn.open(media)
    return Response(307, b"", (("Location", location),))


def _find(message: SimMessage, media_sid: str, path: str) -> SimMedia:
    for media in message.media:
        if media.sid == media_sid:
            return media
    raise not_found(path)


def cdn(sim: Simulator, request: Request) -> Response:
    """GET a CDN link: the file, to a request with no Authorization header."""
    if request.method != "GET":
        return Response(405, b"", (("Allow", "GET"),))
    if "authorization" in request.headers:
        sim.stats.cdn_credentials_refused += 1
        refused = ApiError(403, 20403, "The media link is signed: send no Authorization header")
        return json_reply(403, refused.payload())
    media = sim.cdn.get(request.target.partition("?")[0].removeprefix(CDN_PREFIX))
    if media is None:
        expired = ApiError(403, 20403, "The media link has expired or never existed")
        return json_reply(403, expired.payload())
    sim.stats.cdn_downloads += 1
    return Response(200, media.data, (("Content-Type", media.content_type),))
