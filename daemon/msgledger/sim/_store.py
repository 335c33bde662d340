"""The simulator's in-memory messages: one frozen record per message, replaced on each change.

Everything stays in memory for the simulator's lifetime; a record is a few hundred bytes, so
even a 100k-message benchmark costs tens of megabytes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import NamedTuple

_WHATSAPP = "whatsapp:"
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")
_SHORT_CODE = re.compile(r"[0-9]{3,8}")
_ALPHANUMERIC_ID = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")


OUTBOUND_API = "outbound-api"  # created through the Messages API
INBOUND = "inbound"  # received from a customer
OUTBOUND_REPLY = "outbound-reply"  # created by a TwiML <Message> answering an inbound one
DIRECTIONS = frozenset({OUTBOUND_API, INBOUND, OUTBOUND_REPLY})


class SimMedia(NamedTuple):
    """One media file of a message: its ME SID, content type and bytes."""

    sid: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)  # slots: a million-message benchmark day fits in ~0.5 GB
class SimMessage:
    """One message as the simulator holds it (unredacted)."""

    sid: str
    account_sid: str
    to: str
    from_: str | None  # None until a Messaging Service picks a sender
    body: str
    status: str
    error_code: int | None
    error_message: str | None
    date_created: datetime
    date_updated: datetime
    date_sent: datetime | None
    status_callback: str | None
    messaging_service_sid: str | None
    price: str | None
    num_segments: str
    seq: int  # creation order: breaks ties in the newest-first listing
    direction: str = OUTBOUND_API
    media: tuple[SimMedia, ...] = ()

    @property
    def listed_at(self) -> datetime:
        """The date the list endpoint sorts and filters on (date_created until it is sent)."""
        return self.date_sent or self.date_created

    @property
    def is_inbound(self) -> bool:
        return self.direction == INBOUND

    @property
    def is_whatsapp(self) -> bool:
        return self.to.startswith(_WHATSAPP)


@dataclass(frozen=True)
class NewMessage:
    """A validated create request (or a TwiML <Message>'s reply)."""

    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    status_callback: str | None
    media_urls: tuple[str, ...] = ()  # each MediaUrl, in order


class MessageStore:
    """Messages by SID, in creation order."""

    def __init__(self) -> None:
        self._messages: dict[str, SimMessage] = {}
        self.version = 0  # bumped by every put
        self._seq = itertools.count()

    @property
    def view(self) -> Mapping[str, SimMessage]:
        return MappingProxyType(self._messages)

    def next_seq(self) -> int:
        return next(self._seq)

    def get(self, sid: str) -> SimMessage | None:
        return self._messages.get(sid)

    def put(self, message: SimMessage) -> SimMessage:
        self.version += 1  # what the list's cached order was sorted from has changed
        self._messages[message.sid] = message
        return message

    def __iter__(self) -> Iterator[SimMessage]:
        return iter(self._messages.values())


def utcnow() -> datetime:
    """Now, to the second: the API's RFC 2822 dates carry no finer precision."""
    return datetime.now(UTC).replace(microsecond=0)


def is_valid_to(number: str) -> bool:
    """E.164 (`+` and 8 to 15 digits), optionally behind `whatsapp:`."""
    return _E164.fullmatch(number.removeprefix(_WHATSAPP)) is not None


def is_valid_from(sender: str) -> bool:
    """E.164 (or `whatsapp:` E.164), a short code, or an alphanumeric sender ID."""
    bare = sender.removeprefix(_WHATSAPP)
    return any(p.fullmatch(bare) for p in (_E164, _SHORT_CODE, _ALPHANUMERIC_ID))


def count_segments(body: str) -> str:
    """Segments as Twilio counts them for GSM-7 text (a string, like the API's field)."""
    return "1" if len(body) <= 160 else str(-(-len(body) // 153))
