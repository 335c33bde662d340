"""One message as Twilio listed it, read leniently from either source: a page of the
Messages list (RFC 2822 dates, `error_code` null for none) or a line of a Bulk Export file
(ISO 8601 dates, `error_code` 0 for none) (docs/twilio.md, "List and paging", "Bulk
Export").

A row is read as far as it can be: a field of the wrong type is left out and named in
`problems`, unknown keys stay in `raw`, and only a row without a usable SID is `Broken`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..events import iso_utc

SID = re.compile(r"(SM|MM)[0-9a-fA-F]{32}")  # a message's
OUTBOUND = ("outbound-api", "outbound-call", "outbound-reply")  # Twilio's directions
MAX_RAW = 2000  # characters of a broken line a run report keeps


@dataclass(frozen=True, slots=True)
class Listed:
    """A listed message: the fields the comparison reads, and the row itself."""

    sid: str
    status: str | None
    error_code: int | None
    to: str | None
    from_: str | None
    messaging_service_sid: str | None
    body: str | None
    date_created: str | None  # UTC ISO 8601, as the journal writes times
    date_sent: str | None
    direction: str | None
    raw: Mapping[str, Any]  # verbatim, unknown keys included
    problems: tuple[str, ...] = ()  # the fields that could not be read

    @property
    def outbound(self) -> bool:
        """Sent by the account (a missing direction counts: the list shows both)."""
        return self.direction is None or self.direction in OUTBOUND

    def reported(self) -> dict[str, Any]:
        """What a journaled event keeps of it: the fields as read, `problems`, and under
        `listed` the row verbatim, unknown keys included, but for its body (kept, or not,
        as `store.keep_body` says, by the comparison). Nested, so that a key of Twilio's
        (a file's `flags`) is never read as one of the record's."""
        kept: dict[str, Any] = {"status": self.status, "error_code": self.error_code,
                                "to": self.to, "from": self.from_,
                                "messaging_service_sid": self.messaging_service_sid,
                                "date_created": self.date_created,
                                "date_sent": self.date_sent, "direction": self.direction,
                                "listed": {k: v for k, v in self.raw.items() if k != "body"}}
        if self.problems:
            kept["problems"] = list(self.problems)
        return kept


Parse = Callable[[object], "Listed | Broken"]  # `from_api` or `from_export`


def sid_of(item: object) -> str | None:
    """An item's SID as the store is asked for it: any text under `sid`."""
    sid = item.get("sid") if isinstance(item, dict) else None
    return sid if isinstance(sid, str) else None


@dataclass(frozen=True, slots=True)
class Broken:
    """A row that cannot be reconciled at all (no SID, not an object, not JSON)."""

    why: str
    raw: str  # the row as text, cut at MAX_RAW characters


def from_api(item: object) -> Listed | Broken:
    """A message of a list page (the 2010-04-01 API's JSON)."""
    return _listed(item, _rfc2822, error_zero_is_none=False)


def from_export(item: object) -> Listed | Broken:
    """A line of a Bulk Export file, already parsed from JSON."""
    return _listed(item, _iso, error_zero_is_none=True)


def broken(why: str, raw: bytes | str) -> Broken:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return Broken(why, text[:MAX_RAW])


_TEXTS = ("status", "to", "from", "messaging_service_sid", "body", "direction")
_MOMENTS = ("date_created", "date_sent")


def _listed(item: object, date: Any, *, error_zero_is_none: bool) -> Listed | Broken:
    if not isinstance(item, dict):
        return broken(f"not an object but {type(item).__name__}", repr(item))
    sid = item.get("sid")
    if not isinstance(sid, str) or not SID.fullmatch(sid):
        return broken("no message SID", repr(item))
    problems: list[str] = []
    # One loop each rather than a call a field: a day file has millions of lines.
    texts = [_text_or_none(item.get(name), name, problems) for name in _TEXTS]
    moments = [_moment(item.get(name), name, date, problems) for name in _MOMENTS]
    code = _error_code(item.get("error_code"), problems)
    status, to, from_, service, body, direction = texts
    return Listed(
        sid=sid, status=status, to=to, from_=from_,
        error_code=None if error_zero_is_none and code == 0 else code,
        messaging_service_sid=service, body=body, date_created=moments[0],
        date_sent=moments[1], direction=direction, raw=item, problems=tuple(problems))


def _text_or_none(value: object, name: str, problems: list[str]) -> str | None:
    if value is None or value.__class__ is str:
        return value or None
    problems.append(name)
    return None


def _moment(value: object, name: str, date: Any, problems: list[str]) -> str | None:
    if value is None or value == "":
        return None
    parsed = date(value) if isinstance(value, str) else None
    if parsed is None:
        problems.append(name)
    return parsed


def _error_code(value: object, problems: list[str]) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    problems.append("error_code")
    return None


_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_TWILIO_DATE = re.compile(
    r"[A-Z][a-z]{2}, (\d\d) ([A-Z][a-z]{2}) (\d{4}) ((?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d) \+0000")


def _rfc2822(value: str) -> str | None:
    """`Thu, 30 Jul 2015 20:12:31 +0000` as UTC ISO 8601; None if it is not such a date.
    Twilio's own form is read directly (three times faster than the email parser, which
    a page of a thousand rows would call three thousand times); any other goes to it."""
    exact = _TWILIO_DATE.fullmatch(value)
    month = _MONTHS.get(exact[2]) if exact else None
    if exact and month:
        try:
            dt.date(int(exact[3]), month, int(exact[1]))  # 31 Feb is no day
        except ValueError:
            return None
        return f"{exact[3]}-{month:02d}-{exact[1]}T{exact[4]}.000000+00:00"
    return _utc(email.utils.parsedate_to_datetime, value)


def _iso(value: str) -> str | None:
    """`2026-11-30T10:00:00Z` (or with an offset) as UTC ISO 8601; None if it is not one.
    The export's own form (to the second, `Z`) is checked and rewritten directly: a day file
    has three of them a line."""
    if len(value) == 20 and value[19] == "Z" and value[10] == "T":
        try:
            dt.datetime.fromisoformat(value[:19])
        except ValueError:
            return None
        return f"{value[:19]}.000000+00:00"
    return _utc(dt.datetime.fromisoformat, value)


def _utc(parse: Callable[[str], dt.datetime], value: str) -> str | None:
    """`value` read by `parse` as the journal writes times (a naive time is UTC); None if
    it cannot be read, or is out of range once in UTC (`0001-01-01T00:00:00+01:00`, or
    year 9999 at -2359)."""
    try:
        moment = parse(value)
        return iso_utc(moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
