"""Validation of the JSON bodies and query strings `/v1` accepts.

Every error names the field, and nothing is sent or journaled for a request that fails
here: a 400 is always safe for the caller to correct and retry.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..sender import SendRequest

REF = re.compile(r"[A-Za-z0-9._:\-]{1,64}")  # safe in a URL query, readable in a log line
SID = re.compile(r"(SM|MM)[0-9a-fA-F]{32}")
SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
MAX_BODY_CHARS = 1600  # Twilio's own limit for a message body
MAX_PAGE = 1000


class Invalid(Exception):
    """A request field is missing or malformed; answered 400 naming the field."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


def _object(payload: object, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(payload, dict):
        raise Invalid("body", "expected a JSON object")
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise Invalid(unknown[0], "unknown field")
    return payload


def _string(payload: Mapping[str, Any], name: str, *, required: bool = True,
            pattern: re.Pattern[str] | None = None, max_len: int = 256) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise Invalid(name, "required")
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise Invalid(name, f"expected a non-empty string of at most {max_len} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise Invalid(name, f"does not match {pattern.pattern}")
    return value


def new_ref() -> str:
    return "ml-" + secrets.token_hex(12)


def send_request(payload: object) -> SendRequest:
    """`POST /v1/messages`: to, from or messaging_service_sid, body, optional ref."""
    p = _object(payload, {"to", "from", "messaging_service_sid", "body", "ref"})
    to = _string(p, "to")
    from_ = _string(p, "from", required=False)
    service = _string(p, "messaging_service_sid", required=False, pattern=SERVICE_SID)
    if (from_ is None) == (service is None):
        raise Invalid("from", "give exactly one of from and messaging_service_sid")
    body = _string(p, "body", max_len=MAX_BODY_CHARS)
    ref = _string(p, "ref", required=False, pattern=REF) or new_ref()
    assert to is not None and body is not None
    return SendRequest(to, from_, service, body, ref)


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
    return Registration(sid, to, from_, status,
                        _string(p, "ref", required=False, pattern=REF),
                        _string(p, "body", required=False, max_len=MAX_BODY_CHARS))


@dataclass(frozen=True)
class ListQuery:
    status: str | None
    overdue: bool
    since: str | None  # ISO date or time, inclusive
    until: str | None  # exclusive
    after: int  # cursor: the last message id of the previous page
    limit: int


def list_query(args: Mapping[str, str]) -> ListQuery:
    unknown = sorted(set(args) - {"status", "overdue", "since", "until", "cursor", "limit"})
    if unknown:
        raise Invalid(unknown[0], "unknown parameter")
    return ListQuery(
        status=args.get("status") or None,
        overdue=_flag(args, "overdue"),
        since=_instant(args, "since"),
        until=_instant(args, "until"),
        after=_whole(args, "cursor", 0, 0, 2**62),
        limit=_whole(args, "limit", 100, 1, MAX_PAGE),
    )


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
    except ValueError:
        raise Invalid(name, "expected an ISO 8601 date or time") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC)
    return parsed.replace(tzinfo=dt.UTC).isoformat(timespec="microseconds")


def _whole(args: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    value = args.get(name)
    if value is None:
        return default
    if not value.isdigit() or not minimum <= int(value) <= maximum:
        raise Invalid(name, f"expected a whole number from {minimum} to {maximum}")
    return int(value)
