"""The Messages list endpoint: filters, newest-first order, keyset paging and the page envelope.

Paging is by keyset, not offset: a `PageToken` names the last (or first) message of the page it
came from, so messages created while a client pages through the list land before the cursor
and never shift a later page. Each message is seen once as long as its `date_sent` stays put.

With the `list_lag` knob a message is left out until it was listed at least that long ago
(Twilio's list has lagged 10 to 15 minutes behind its messages,
https://github.com/twilio/twilio-java/issues/442); once it shows it takes its place by
`date_sent`, perhaps behind a cursor already past it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

from ._store import SimMessage
from ._wire import ApiError, message_json, messages_uri

DEFAULT_PAGE_SIZE = 50  # Twilio's default
MAX_PAGE_SIZE = 1000  # Twilio's maximum; larger requests are clamped
_FILTER_KEYS = ("To", "From", "DateSent", "DateSent<", "DateSent>")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SortKey = tuple[int, int]  # (listed_at in microseconds since the epoch, creation sequence)


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: just after `key` (the next page) or just before it (the previous)."""

    after: bool
    key: SortKey

    def token(self) -> str:
        raw = f"{self.key[0]}.{self.key[1]}".encode()
        return ("PA" if self.after else "PB") + raw.hex()

    @classmethod
    def parse(cls, token: str) -> Cursor:
        try:
            micros, seq = bytes.fromhex(token[2:]).decode().split(".")
            if token[:2] not in ("PA", "PB"):
                raise ValueError(token)
            return cls(after=token[:2] == "PA", key=(int(micros), int(seq)))
        except ValueError:
            raise ApiError(400, 20001, f"Invalid PageToken: {token}") from None


@dataclass(frozen=True)
class ListQuery:
    """A parsed list request."""

    filters: tuple[tuple[str, str], ...]  # as received, echoed into the page URIs
    to: str | None
    from_: str | None
    sent_on: date | None
    sent_on_or_before: date | None
    sent_on_or_after: date | None
    page_size: int
    page: int
    cursor: Cursor | None


@dataclass(frozen=True)
class PageSlice:
    """One page of messages and whether pages exist on either side of it."""

    items: tuple[SimMessage, ...]
    start: int
    has_next: bool


def sort_key(message: SimMessage) -> SortKey:
    return ((message.listed_at - _EPOCH) // timedelta(microseconds=1), message.seq)


def parse_list_query(params: Mapping[str, str]) -> ListQuery:
    """Read the list parameters; dates count by whole GMT days, inclusive."""
    token = params.get("PageToken")
    return ListQuery(
        filters=tuple((k, params[k]) for k in _FILTER_KEYS if k in params),
        to=params.get("To"),
        from_=params.get("From"),
        sent_on=_parse_day(params, "DateSent"),
        sent_on_or_before=_parse_day(params, "DateSent<"),
        sent_on_or_after=_parse_day(params, "DateSent>"),
        page_size=min(parse_int(params, "PageSize", DEFAULT_PAGE_SIZE, minimum=1), MAX_PAGE_SIZE),
        page=parse_int(params, "Page", 0, minimum=0),
        cursor=Cursor.parse(token) if token else None,
    )


def _parse_day(params: Mapping[str, str], key: str) -> date | None:
    """`YYYY-MM-DD` or the client's `%Y-%m-%dT%H:%M:%SZ`; only the day counts."""
    value = params.get(key)
    if value is None:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise ApiError(400, 20001, f"Invalid {key}: {value}") from None


def parse_int(params: Mapping[str, str], key: str, default: int, *, minimum: int) -> int:
    value = params.get(key)
    if value is None:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise ApiError(400, 20001, f"Invalid {key}: {value}")
    return int(value)


def _matches(message: SimMessage, query: ListQuery) -> bool:
    day = message.listed_at.astimezone(UTC).date()
    return (
        (query.to is None or message.to == query.to)
        and (query.from_ is None or message.from_ == query.from_)
        and (query.sent_on is None or day == query.sent_on)
        and (query.sent_on_or_before is None or day <= query.sent_on_or_before)
        and (query.sent_on_or_after is None or day >= query.sent_on_or_after)
    )


def visible(messages: Iterable[SimMessage], lag: float, now: datetime) -> Iterable[SimMessage]:
    """The messages the list shows at `now`: those listed at least `lag` seconds before."""
    if lag <= 0:
        return messages
    cutoff = now - timedelta(seconds=lag)
    return (m for m in messages if m.listed_at <= cutoff)


Ordered = tuple[list[SimMessage], list[SortKey]]  # newest first, and their negated keys


def ordered(messages: Iterable[SimMessage], query: ListQuery) -> Ordered:
    """The messages matching `query`, newest first, with the negated sort keys that let
    bisect find a cursor in that order (negated keys ascend)."""
    found = sorted((m for m in messages if _matches(m, query)), key=sort_key, reverse=True)
    return found, [(-a, -b) for a, b in map(sort_key, found)]


class ListCache:
    """The last listing's order, kept while the messages and the filters stay the same: a
    client paging through a million messages would otherwise have them all sorted again
    for every page of a thousand."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._ordered: Ordered = ([], [])

    def get(self, messages: Iterable[SimMessage], query: ListQuery, version: int) -> Ordered:
        key = (version, query.to, query.from_, query.sent_on, query.sent_on_or_before,
               query.sent_on_or_after)
        if key != self._key:
            self._key, self._ordered = key, ordered(messages, query)
        return self._ordered


def select_page(messages: Iterable[SimMessage], query: ListQuery,
                cached: Ordered | None = None) -> PageSlice:
    """The page the query asks for, from matching messages sorted newest first (`cached`:
    that order, already made)."""
    found, negated = cached if cached is not None else ordered(messages, query)
    start, stop = 0, query.page_size
    if query.cursor is not None:
        anchor = (-query.cursor.key[0], -query.cursor.key[1])
        if query.cursor.after:
            start = bisect.bisect_right(negated, anchor)
            stop = start + query.page_size
        else:
            stop = bisect.bisect_left(negated, anchor)
            start = max(0, stop - query.page_size)
    items = tuple(found[start:stop])
    return PageSlice(items=items, start=start, has_next=start + len(items) < len(found))


def page_json(
    account_sid: str, query: ListQuery, page: PageSlice, *, redact_to: Callable[[SimMessage], bool]
) -> dict[str, object]:
    """The list envelope: `messages` plus Twilio's paging fields; `redact_to` says whose `to`
    ends in XXXX."""
    first = page.items[0] if page.items else None
    last = page.items[-1] if page.items else None
    offset = query.page * query.page_size
    return {
        "messages": [message_json(m, redact_to=redact_to(m)) for m in page.items],
        "first_page_uri": _page_uri(account_sid, query, 0, None),
        "next_page_uri": _page_uri(account_sid, query, query.page + 1, Cursor(True, sort_key(last)))
        if page.has_next and last
        else None,
        "previous_page_uri": _page_uri(
            account_sid, query, query.page - 1, Cursor(False, sort_key(first))
        )
        if page.start > 0 and query.page > 0 and first
        else None,
        "page": query.page,
        "page_size": query.page_size,
        "start": offset,
        "end": offset + max(len(page.items) - 1, 0),
        "uri": _page_uri(account_sid, query, query.page, query.cursor),
    }


def _page_uri(account_sid: str, query: ListQuery, page: int, cursor: Cursor | None) -> str:
    params = [*query.filters, ("PageSize", str(query.page_size)), ("Page", str(page))]
    if cursor is not None:
        params.append(("PageToken", cursor.token()))
    return f"{messages_uri(account_sid)}?{urlencode(params)}"
