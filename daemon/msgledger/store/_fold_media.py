"""How a message's media folds: declared once, then fetched, failed or refused, per file.

A message's media is declared by the event that first lists it: an inbound webhook's
`MediaUrl{N}` fields (checked at receipt: `inbound.media`), or a send's `media_url` list.
The fetcher's `media_archived` and `media_failed` events then settle each file, found by
its index `n`. The rules are the fold's (`_fold.apply`): pure, in journal order, so a
replay rebuilds the same list.

States: `pending` (to fetch: now, or at `retry_at`), `archived` (fetched whole),
`truncated` (over `store.max_media_bytes`: hash and size of what was read, bytes not
kept), `failed` (given up), `refused` (never fetched: its URL is not the message's own at
Twilio, or the webhook's count of media disagrees), `unfetched` (`store.keep_media =
none`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..events import Event

PENDING, ARCHIVED, TRUNCATED, FAILED = "pending", "archived", "truncated", "failed"
REFUSED, UNFETCHED = "refused", "unfetched"
STATES = frozenset({PENDING, ARCHIVED, TRUNCATED, FAILED, REFUSED, UNFETCHED})
SETTLED_STATES = frozenset({ARCHIVED, TRUNCATED})  # a later failure changes nothing


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One media file of a message, as the record lists it."""

    n: int  # its index: MediaUrl{n} of a webhook, the n-th of a send's or of Twilio's list
    url: str | None
    content_type: str | None = None
    state: str = PENDING
    size: int | None = None
    sha256: str | None = None
    kept: bool = False  # its bytes are in the store (`store.keep_media = full`)
    attempts: int = 0  # fetches that failed
    retry_at: str | None = None  # when the fetcher tries again, after a failure
    error: str | None = None  # the last failure's reason

    def as_json(self) -> dict[str, Any]:
        return {"n": self.n, "url": self.url, "content_type": self.content_type,
                "state": self.state, "size": self.size, "sha256": self.sha256,
                "kept": self.kept, "attempts": self.attempts, "retry_at": self.retry_at,
                "error": self.error}


NO_MEDIA: tuple[MediaItem, ...] = ()


def fold_media(media: tuple[MediaItem, ...], event: Event) -> tuple[MediaItem, ...]:
    """`media` after `event`."""
    if event.kind == "media_archived":
        return _settle(media, event.data, _archived)
    if event.kind == "media_failed":
        return _settle(media, event.data, _failed)
    declared = event.data.get("media")
    if media or not isinstance(declared, list) or not declared:
        return media  # the first declaration stands: a duplicate webhook changes nothing
    return tuple(item for entry in declared if (item := _declared(entry)) is not None)


def media_due(media: Iterable[MediaItem], since: str, sid: str | None) -> str | None:
    """When the fetcher next has work on this message: the earliest pending file's retry
    time, or `since` for one never tried; None when there is none (or no SID to fetch by)."""
    due = [item.retry_at or since for item in media if item.state == PENDING]
    return min(due) if due and sid is not None else None


def media_from_json(raw: object) -> tuple[MediaItem, ...]:
    """The stored column (a JSON list, as `as_json` writes) back into items."""
    if not isinstance(raw, list):
        return NO_MEDIA
    return tuple(MediaItem(**entry) for entry in raw if isinstance(entry, dict))


def _declared(entry: object) -> MediaItem | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("n"), int):
        return None
    state = entry.get("state", PENDING)
    return MediaItem(n=entry["n"], url=_text(entry.get("url")),
                     content_type=_text(entry.get("content_type")),
                     state=state if state in STATES else REFUSED)


Settle = Callable[[MediaItem, Mapping[str, Any]], MediaItem]


def _settle(media: tuple[MediaItem, ...], data: Mapping[str, Any],
            how: Settle) -> tuple[MediaItem, ...]:
    n = data.get("n")
    if not isinstance(n, int):
        return media
    found = [item for item in media if item.n == n]
    item = found[0] if found else MediaItem(n=n, url=_text(data.get("url")))
    new = how(item, data)
    if found:
        return tuple(new if other.n == n else other for other in media)
    return tuple(sorted((*media, new), key=lambda m: m.n))


def _archived(item: MediaItem, data: Mapping[str, Any]) -> MediaItem:
    if item.state in SETTLED_STATES:
        return item  # fetched twice (a restart mid-fetch): the first stays
    size = data.get("size")
    return replace(item, state=TRUNCATED if data.get("truncated") else ARCHIVED,
                   content_type=_text(data.get("content_type")) or item.content_type,
                   size=size if isinstance(size, int) else None,
                   sha256=_text(data.get("sha256")), kept=data.get("kept") is True,
                   url=item.url or _text(data.get("url")), retry_at=None, error=None)


def _failed(item: MediaItem, data: Mapping[str, Any]) -> MediaItem:
    if item.state != PENDING:
        return item
    retry_at = _text(data.get("retry_at"))
    return replace(item, attempts=item.attempts + 1, retry_at=retry_at,
                   state=PENDING if retry_at else FAILED, error=_text(data.get("error")))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None

