"""Validation of the JSON bodies and query strings `/v1` accepts.

Every error names the field, and nothing is sent or journaled for a request that fails
here: a 400 is always safe for the caller to correct and retry. Everything a client sends
is checked here, at the edge, so no text reaches the journal that it cannot store: bodies
are strict UTF-8 JSON objects without repeated keys, every string must be encodable as
UTF-8 (a JavaScript client that cuts a string inside an emoji sends a lone surrogate), and
numbers and instants are range-checked before Python's own limits can raise.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..sender import SendRequest, new_ref
from .webhooks import SID, SID_SHAPED  # defined with the receiver: the front imports it alone

if TYPE_CHECKING:
    from ..reconcile.run import Source

REF = re.compile(r"[A-Za-z0-9._:\-]{1,64}")  # safe in a URL query, readable in a log line
SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit also takes '²' and '٣'
MAX_BODY_CHARS = 1600  # Twilio's own limit for a message body
MAX_PAGE = 1000
MAX_JSON_BYTES = 64 * 1024  # a 1,600-character body of 6-byte \u escapes and the rest fit
MAX_TEXT = 256  # characters in any other string field or query parameter
MAX_NAME_ECHO = 64  # characters of a (hostile) field name quoted back in an error
DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # fromisoformat alone also takes 20240501
SOURCES = ("auto", "list", "export")  # reconciler.source's choices, as a run may ask
RUNS_SHOWN = 20  # GET /v1/reconcile/runs without a limit: a week or so of daily runs
MAX_RUNS_SHOWN = 100  # as many as the reconciler keeps in memory


class Invalid(Exception):
    """A request field is missing or malformed; answered 400 naming the field."""

    def __init__(self, field: str, why: str) -> None:
        field = _printable(field)
        super().__init__(f"{field}: {why}")
        self.field = field


def _printable(name: str) -> str:
    """`name` as an answer can quote it: UTF-8 clean and short."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_NAME_ECHO]


def _encodable(text: str) -> bool:
    """False for text UTF-8 cannot hold (a lone surrogate): the journal could not store it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(raw: bytes) -> object:
    """A request body as JSON: strict UTF-8, no repeated keys, any nesting the parser can
    take. Anything else is Invalid naming `body` (or the repeated key)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("body", "not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:  # the C parser's own limit: nested deeper than it recurses
        raise Invalid("body", "nested too deeply") from None
    except ValueError:  # malformed, or an integer past Python's 4,300-digit limit
        raise Invalid("body", "malformed JSON") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all distinct: which of two values counts is ambiguous (a
    proxy may have checked the first), so a repeated key is refused, not picked."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise Invalid(key, "given more than once")
        found[key] = value
    return found


def _object(payload: object, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(payload, dict):
        raise Invalid("body", "expected a JSON object")
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise Invalid(unknown[0], "unknown field")
    return payload


def _string(payload: Mapping[str, Any], name: str, *, required: bool = True,
            pattern: re.Pattern[str] | None = None, max_len: int = MAX_TEXT) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise Invalid(name, "required")
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise Invalid(name, f"expected a non-empty string of at most {max_len} characters")
    if not _encodable(value):
        raise Invalid(name, "not valid Unicode text (a lone surrogate: half a UTF-16 pair)")
    if pattern is not None and not pattern.fullmatch(value):
        raise Invalid(name, f"does not match {pattern.pattern}")
    return value


def _ref(payload: Mapping[str, Any]) -> str | None:
    ref = _string(payload, "ref", required=False, pattern=REF)
    if ref is not None and SID_SHAPED.fullmatch(ref):
        raise Invalid("ref", "has the shape of a message SID; a ref must not")
    return ref


MAX_MEDIA_URLS = 10  # Twilio's limit for one message
MAX_URL = 2048
URL = re.compile(r"https?://[!-~]+")  # printable ASCII, no space: as a URL is sent


def send_request(payload: object) -> SendRequest:
    """`POST /v1/messages`: to, from or messaging_service_sid, body and/or media_url,
    optional ref."""
    p = _object(payload, {"to", "from", "messaging_service_sid", "body", "ref", "media_url"})
    to = _string(p, "to")
    from_ = _string(p, "from", required=False)
    service = _string(p, "messaging_service_sid", required=False, pattern=SERVICE_SID)
    if (from_ is None) == (service is None):
        raise Invalid("from", "give exactly one of from and messaging_service_sid")
    media = _media_urls(p)
    body = _string(p, "body", required=not media, max_len=MAX_BODY_CHARS) or ""
    ref = _ref(p) or new_ref()
    assert to is not None
    return SendRequest(to, from_, service, body, ref, media)


def _media_urls(payload: Mapping[str, Any]) -> tuple[str, ...]:
    """`media_url`: 1 to 10 http(s) URLs Twilio fetches the files from."""
    urls = payload.get("media_url")
    if urls is None:
        return ()
    if not isinstance(urls, list) or not 1 <= len(urls) <= MAX_MEDIA_URLS:
        raise Invalid("media_url", f"expected a list of 1 to {MAX_MEDIA_URLS} URLs")
    for url in urls:
        if not (isinstance(url, str) and URL.fullmatch(url) and len(url) <= MAX_URL):
            raise Invalid("media_url", f"expected http:// or https:// URLs of at most"
                          f" {MAX_URL} printable ASCII characters, without spaces")
    return tuple(urls)


@dataclass(frozen=True)
class Registration:
    sid: str
    to: str
    from_: str
    status: str
    ref: str | None
    body: str | None


def registration(payload: object) -> Registration:
    """`POST /v1/messages/register`: sid, to, from, status, optional ref and body."""
    p = _object(payload, {"sid", "to", "from", "status", "ref", "body"})
    values = [_string(p, name, pattern=SID if name == "sid" else None)
              for name in ("sid", "to", "from", "status")]
    sid, to, from_, status = (str(v) for v in values)
    return Registration(sid, to, from_, status, _ref(p),
                        _string(p, "body", required=False, max_len=MAX_BODY_CHARS))


MAX_MEDIA = 1000  # Twilio takes 10 media a message; a webhook may name MediaUrl0 to 999


def media_index(text: str) -> int:
    """`n` of `GET /v1/messages/{key}/media/{n}`: a whole number from 0."""
    if not DIGITS.fullmatch(text) or int(text) >= MAX_MEDIA:
        raise Invalid("n", f"expected a whole number from 0 to {MAX_MEDIA - 1}")
    return int(text)


@dataclass(frozen=True)
class ListQuery:
    status: str | None
    overdue: bool
    since: str | None  # ISO date or time, inclusive
    until: str | None  # exclusive
    after: int  # cursor: the last message id of the previous page
    limit: int


LIST_PARAMETERS = frozenset({"status", "overdue", "since", "until", "cursor", "limit"})


def list_query(pairs: Iterable[tuple[str, str]]) -> ListQuery:
    """`GET /v1/messages`: the query's (name, value) pairs, each name at most once."""
    args = _parameters(pairs)
    return ListQuery(
        status=_string(args, "status", required=False) if args.get("status") else None,
        overdue=_flag(args, "overdue"),
        since=_instant(args, "since"),
        until=_instant(args, "until"),
        after=_whole(args, "cursor", 0, 0, 2**62),
        limit=_whole(args, "limit", 100, 1, MAX_PAGE),
    )


def _parameters(pairs: Iterable[tuple[str, str]],
                allowed: frozenset[str] = LIST_PARAMETERS) -> dict[str, str]:
    args: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise Invalid(name, "unknown parameter")
        if name in args:  # which one counts is ambiguous: refused, as in bodies
            raise Invalid(name, "given more than once")
        args[name] = value
    return args


@dataclass(frozen=True)
class ReconcileRequest:
    day: dt.date
    source: Source


def reconcile_request(payload: object, *, today: dt.date,
                      exportable_until: dt.date) -> ReconcileRequest:
    """`POST /v1/reconcile`: `date`, a UTC day up to `today`, and optional `source`; a day
    after `exportable_until` has no Bulk Export file yet, so `export` is refused for it."""
    p = _object(payload, {"date", "source"})
    day = _day(p, today)
    source = _string(p, "source", required=False) or "auto"
    if source not in SOURCES:
        raise Invalid("source", "expected auto, list or export")
    if source == "export" and day > exportable_until:
        raise Invalid("source", f"Bulk Export has no file of {day} yet: Twilio exports a day"
                      f" once it is two days old (the latest now is {exportable_until});"
                      " ask for list or auto")
    return ReconcileRequest(day, cast("Source", source))


FIRST_DAY = dt.date(2008, 1, 1)  # before Twilio existed: nothing to list (and no overflow)


def _day(payload: Mapping[str, Any], today: dt.date) -> dt.date:
    text = str(_string(payload, "date"))
    if not DAY.fullmatch(text):
        raise Invalid("date", "expected YYYY-MM-DD")
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise Invalid("date", f"{text} is not a day of the calendar") from None
    if day > today:
        raise Invalid("date", f"{day} is in the future: today is {today} (UTC), and a run"
                      " covers a day up to now")
    if day < FIRST_DAY:
        raise Invalid("date", f"{day} is before {FIRST_DAY}: Twilio keeps no messages so old")
    return day


RUNS_PARAMETERS = frozenset({"limit"})


def runs_query(pairs: Iterable[tuple[str, str]]) -> int:
    """`GET /v1/reconcile/runs`: how many runs at most (`limit`), and nothing else."""
    args = _parameters(pairs, RUNS_PARAMETERS)
    return _whole(args, "limit", RUNS_SHOWN, 1, MAX_RUNS_SHOWN)


def _flag(args: Mapping[str, str], name: str) -> bool:
    value = args.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise Invalid(name, "expected true or false")
    return value in ("true", "1")


def _instant(args: Mapping[str, str], name: str) -> str | None:
    value = args.get(name)
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
        if parsed.tzinfo is not None:  # past year 9999 or before year 1 once in UTC
            parsed = parsed.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise Invalid(name, "expected an ISO 8601 date or time from year 1 to 9999 UTC") from None
    return parsed.replace(tzinfo=dt.UTC).isoformat(timespec="microseconds")


def _whole(args: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    value = args.get(name)
    if value is None:
        return default
    if not DIGITS.fullmatch(value) or not minimum <= int(value) <= maximum:
        raise Invalid(name, f"expected a whole number from {minimum} to {maximum}")
    return int(value)
