"""Media files: made up for outbound MediaUrl, generated for the control route, their JSON,
and the CDN links the media URLs redirect to.

Twilio keeps a copy of each file of a message
(https://www.twilio.com/docs/messaging/api/media-resource). The simulator cannot fetch a
MediaUrl (it runs offline), so a create's file is bytes made from its URL, with the content
type its extension suggests. A CDN link stands for the signed
storage URL Twilio's media URL redirects to: good for `CDN_LINK_TTL` Trio seconds, as often
as asked.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from ._knobs import Dice
from ._listing import DEFAULT_PAGE_SIZE, parse_int
from ._store import SimMedia, SimMessage
from ._wire import API_VERSION, rfc2822

CDN_PREFIX = "/cdn/"
CDN_LINK_TTL = 4 * 3600.0  # Trio seconds a CDN link serves its file
MAX_MEDIA = 10  # files a message may carry (the Media resource page's limit)
DEFAULT_CONTENT_TYPE = "image/jpeg"
_TYPES = {  # by extension; a fixed table, so no host's mime.types changes an answer
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif",
    "webp": "image/webp", "mp4": "video/mp4", "3gp": "video/3gpp", "mp3": "audio/mpeg",
    "ogg": "audio/ogg", "pdf": "application/pdf", "vcf": "text/vcard", "txt": "text/plain",
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def guess_content_type(url: str) -> str:
    """The content type a URL's extension suggests, else image/jpeg."""
    name = urlsplit(url).path.rpartition("/")[2]
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    return _TYPES.get(extension, DEFAULT_CONTENT_TYPE)


def media_for_urls(urls: Iterable[str], dice: Dice) -> tuple[SimMedia, ...]:
    """A file for each MediaUrl of a create: deterministic bytes made from the URL."""
    return tuple(SimMedia("ME" + dice.hex32(), guess_content_type(url),
                          b"sim-media:" + url.encode()) for url in urls)


def generated_files(count: int) -> tuple[tuple[str, bytes], ...]:
    """`count` small files, PNG and JPEG in turn, each with different bytes."""
    return tuple(("image/png", tiny_png(n)) if n % 2 == 0 else ("image/jpeg", tiny_jpeg(n))
                 for n in range(count))


def tiny_png(n: int) -> bytes:
    """A valid 1x1 RGB PNG whose red level is `n`."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes([0, n % 256, 0, 0]))  # one row: filter byte, then R, G, B
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND")


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_jpeg(n: int) -> bytes:
    """JPEG-like bytes: start of image, a JFIF header, a comment, end of image (no picture:
    a reader that checks the magic numbers is satisfied, a decoder is not)."""
    jfif = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    comment = f"sim-media {n}".encode()
    return b"\xff\xd8" + jfif + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment \
        + b"\xff\xd9"


def media_path(account_sid: str, message_sid: str, media_sid: str | None = None) -> str:
    """A message's media list path, or one file's (no extension: the file, by a redirect)."""
    base = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{message_sid}/Media"
    return base if media_sid is None else f"{base}/{media_sid}"


def media_json(message: SimMessage, media: SimMedia) -> dict[str, object]:
    """The Media resource (twilio-python's MediaInstance fields)."""
    date = rfc2822(message.date_created)
    return {
        "sid": media.sid,
        "parent_sid": message.sid,
        "account_sid": message.account_sid,
        "content_type": media.content_type,
        "date_created": date,
        "date_updated": date,
        "uri": media_path(message.account_sid, message.sid, media.sid) + ".json",
    }


def media_page_json(message: SimMessage, params: Mapping[str, str]) -> dict[str, object]:
    """Every file of a message on one page (there are at most ten), in the API's envelope."""
    size = parse_int(params, "PageSize", DEFAULT_PAGE_SIZE, minimum=1)
    uri = f"{media_path(message.account_sid, message.sid)}.json?PageSize={size}&Page=0"
    return {
        "media_list": [media_json(message, media) for media in message.media],
        "first_page_uri": uri,
        "next_page_uri": None,
        "previous_page_uri": None,
        "page": 0,
        "page_size": size,
        "start": 0,
        "end": max(len(message.media) - 1, 0),
        "uri": uri,
    }


@dataclass(frozen=True)
class _Link:
    media: SimMedia
    expires_at: float  # Trio time


class CdnLinks:
    """Tokens of the CDN links handed out, each naming one file until it expires."""

    def __init__(self, dice: Dice) -> None:
        self._dice = dice
        self._links: dict[str, _Link] = {}

    def open(self, media: SimMedia, ttl: float = CDN_LINK_TTL) -> str:
        """A fresh token for `media`; expired ones are forgotten on the way."""
        now = trio.current_time()
        self._links = {t: link for t, link in self._links.items() if link.expires_at > now}
        token = self._dice.hex32()
        self._links[token] = _Link(media, now + ttl)
        return token

    def get(self, token: str) -> SimMedia | None:
        """The file behind a token, or None once it expired (or if it never was)."""
        link = self._links.get(token)
        if link is None or link.expires_at <= trio.current_time():
            return None
        return link.media
