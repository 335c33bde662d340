"""Twilio's wire formats: the Message resource JSON, error JSON, dates and resource URIs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime

from ._http import Response
from ._knobs import SimKnobs
from ._store import SimMessage

API_VERSION = "2010-04-01"
PRICE_PER_SEGMENT = 0.0079  # USD, roughly a US SMS segment; only there so `price` is filled in
_JSON = ("Content-Type", "application/json; charset=utf-8")


class ApiError(Exception):
    """An API request refused with Twilio's error JSON."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def payload(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }


def json_reply(
    status: int, payload: Mapping[str, object], headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    return Response(status, json.dumps(payload).encode(), (_JSON, *headers))


def not_found(path: str) -> ApiError:
    return ApiError(404, 20404, f"The requested resource {path} was not found")


def rfc2822(moment: datetime | None) -> str | None:
    """Twilio's date format, e.g. "Thu, 30 Jul 2015 20:12:31 +0000"."""
    return None if moment is None else format_datetime(moment.astimezone(UTC))


def messages_uri(account_sid: str) -> str:
    return f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"


def message_uri(account_sid: str, sid: str) -> str:
    return f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}.json"


def redact(number: str) -> str:
    """Phone-number redaction: the last four digits become XXXX
    (docs/twilio.md, "Phone-number redaction")."""
    return number[:-4] + "XXXX" if number[-4:].isdigit() else number


def hides_number(knobs: SimKnobs, created: datetime, now: datetime) -> bool:
    """Whether redaction has reached a message created then: at once with `redact_to`, or
    once it is `redact_to_after` seconds old (Twilio: within 24 hours of sending)."""
    after = knobs.redact_to_after
    return knobs.redact_to or (after is not None and (now - created).total_seconds() >= after)


def redacts_to(knobs: SimKnobs, message: SimMessage, now: datetime) -> bool:
    """Whether fetch, list and export files show this message's `to` ending in XXXX now."""
    return hides_number(knobs, message.date_created, now)


def shown_numbers(message: SimMessage, *, redact_to: bool) -> tuple[str, str | None]:
    """`to` and `from` as shown: redaction hides the customer's number, which is the `from`
    of a received text and the `to` of any other."""
    if not redact_to:
        return message.to, message.from_
    if message.is_inbound:
        return message.to, None if message.from_ is None else redact(message.from_)
    return redact(message.to), message.from_


def message_json(message: SimMessage, *, redact_to: bool) -> dict[str, object]:
    """The Message resource as fetch, list and create return it (`redact_to`: whether the
    customer's number ends in XXXX, see `shown_numbers`)."""
    uri = message_uri(message.account_sid, message.sid)
    to, from_ = shown_numbers(message, redact_to=redact_to)
    return {
        "account_sid": message.account_sid,
        "api_version": API_VERSION,
        "body": message.body,
        "date_created": rfc2822(message.date_created),
        "date_sent": rfc2822(message.date_sent),
        "date_updated": rfc2822(message.date_updated),
        "direction": message.direction,
        "error_code": message.error_code,
        "error_message": message.error_message,
        "from": from_,
        "messaging_service_sid": message.messaging_service_sid,
        "num_media": str(len(message.media)),
        "num_segments": message.num_segments,
        "price": message.price,
        "price_unit": "USD",
        "sid": message.sid,
        "status": message.status,
        "subresource_uris": {
            "media": uri.removesuffix(".json") + "/Media.json",
            "feedback": uri.removesuffix(".json") + "/Feedback.json",
        },
        "to": to,
        "uri": uri,
    }


def price_for(segments: str) -> str:
    return f"-{PRICE_PER_SEGMENT * int(segments):.5f}"
