"""The comparison of one day's listing with the store, the same for both sources
(docs/design.md, "The daily reconciler"). No I/O here: the run (`run.py`) reads the
listing and the store in batches and journals the events this returns.

For each listed message:
- a SID the store knows: a `reconciled` event if Twilio's status ranks higher than the
  store's, is a terminal status the store has not seen, or the store had flagged the
  message missing (Twilio has it after all); nothing otherwise;
- a SID it does not know: matched against the sends whose outcome is unknown (same `To`,
  its last four digits aside when Twilio's copy ends in XXXX; same sender; created within
  `match_window`; same body hash when the listing shows a body). One candidate:
  `sid_matched`. Several: each is flagged `ambiguous_match`, and the listed message is
  imported with that flag too. None: imported, flagged `imported`. An inbound message
  (`direction: inbound`) is never a send: unknown, it is imported and flagged
  `missed_webhook` too, since its webhook never reached the journal. An `outbound-reply`
  (a TwiML `<Message>` of the firm's app) is matched like a send: its reply was journaled
  as one, without a SID until its first callback.

After the listing: the day's messages with a SID that it did not name are fetched by SID
(the caller does that; `unlisted`, `after_fetch`), and the day's sends of unknown outcome
that nothing matched are flagged `not_created` once the day is closed (`unmatched`).

Every event states only what is new, so a second run over the same day finds nothing to
journal: the status is no longer higher, the SID is now known, the flag is already there.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..events import Event
from ..store import rank
from ..store._fold import MISSING, NOT_CREATED, NOT_FOUND, TERMINAL_RANK
from ..store._reconcile import DayMessage, Known, UnknownSend
from ..twilio_api import Fetched
from .rows import SID, Broken, Listed, Parse, sid_of

_ISO_TIME = re.compile(r"([01]\d|2[0-3]):[0-5]\d:[0-5]\dZ")
_RFC_TIME = re.compile(r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d \+0000")
AMBIGUOUS = "ambiguous_match"
IMPORTED = "imported"
MISSED_WEBHOOK = "missed_webhook"  # an inbound message the webhook never brought
_GONE = frozenset({MISSING, NOT_FOUND})


@dataclass(frozen=True)
class Day:
    """The UTC day a run covers, as the bounds the journal's times compare with."""

    date: dt.date
    start: str = field(init=False)  # each listed row is compared with these: made once
    end: str = field(init=False)
    _iso: str = field(init=False)  # the day as Twilio's dates spell it (`exactly_on`)
    _rfc: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", f"{self.date.isoformat()}T00:00:00")
        next_day = self.date + dt.timedelta(days=1)
        object.__setattr__(self, "end", f"{next_day.isoformat()}T00:00:00")
        object.__setattr__(self, "_iso", f"{self.date.isoformat()}T")
        object.__setattr__(self, "_rfc", self.date.strftime("%d %b %Y"))

    def exactly_on(self, value: object) -> bool:
        """Whether `value` is one of the two forms Twilio writes a UTC time in, on this
        day: a file's `2026-11-27T12:00:00Z`, a page's `Fri, 27 Nov 2026 12:00:00 +0000`.
        False for anything else, which the full reading then decides."""
        if not isinstance(value, str):
            return False
        if len(value) == 20:
            return value.startswith(self._iso) and _ISO_TIME.fullmatch(value, 11) is not None
        return (len(value) == 31 and value[5:16] == self._rfc
                and _RFC_TIME.fullmatch(value, 17) is not None)

    @property
    def closes_at(self) -> dt.datetime:
        return dt.datetime.combine(self.date + dt.timedelta(days=1), dt.time(), dt.UTC)

    def holds(self, moment: str | None) -> bool:
        return moment is not None and self.start <= moment < self.end


class Seen:
    """Which of the day's stored messages the listing named: one bit per message id
    between the day's lowest and highest, so ten million messages take about a megabyte."""

    def __init__(self, id_range: tuple[int, int] | None) -> None:
        self._low, high = id_range or (1, 0)
        self._bits = bytearray(max(0, high - self._low) // 8 + 1)
        self._high = high

    def began_after(self, message_id: int) -> bool:
        """Whether the message came into the store after the run began (above the day's
        ids then): one of this run's imports, or a callback's since."""
        return message_id > self._high

    def add(self, message_id: int) -> None:
        if self._low <= message_id <= self._high:
            offset = message_id - self._low
            self._bits[offset >> 3] |= 1 << (offset & 7)

    def __contains__(self, message_id: int) -> bool:
        if not self._low <= message_id <= self._high:
            return False
        offset = message_id - self._low
        return bool(self._bits[offset >> 3] & (1 << (offset & 7)))


class Candidates:
    """The sends of unknown outcome a listed message may be, by `To` without its last four
    digits (all a redacted number shows)."""

    def __init__(self, sends: Iterable[UnknownSend], window: float, since: str) -> None:
        self._window = window
        self._by_prefix: dict[str, list[UnknownSend]] = collections.defaultdict(list)
        # (A send flagged ambiguous stays a candidate: whether a later listed message is
        # ambiguous must not depend on the order of the listing.)
        self._created: dict[str, float] = {}
        self.matched: set[str] = set()  # refs given a SID this run: no longer candidates
        self.ambiguous: set[str] = set()  # refs flagged ambiguous this run: still candidates
        self.since = since  # the sends journaled since then are here; `add` the older
        self.add(sends)

    def add(self, sends: Iterable[UnknownSend]) -> None:
        for send in sends:
            if send.ref in self._created:
                continue
            if send.to:
                self._by_prefix[send.to[:-4]].append(send)
            self._created[send.ref] = _timestamp(send.created_at)

    def all(self) -> Iterable[UnknownSend]:
        for sends in self._by_prefix.values():
            yield from sends

    def of(self, listed: Listed) -> list[UnknownSend]:
        """The unmatched sends `listed` may be."""
        if not listed.to:
            return []
        created = _timestamp(listed.date_created) if listed.date_created else None
        return [send for send in self._by_prefix.get(listed.to[:-4], ())
                if send.ref not in self.matched and _same_to(listed.to, send.to)
                and _same_sender(listed, send) and _same_body(listed, send)
                and created is not None
                and abs(created - self._created[send.ref]) <= self._window]


@dataclass
class Comparison:
    """One run's comparison: feed it the listing in batches, then the unlisted."""

    run_id: str
    day: Day
    candidates: Candidates
    seen: Seen
    keep_body: str  # store.keep_body: what an imported message keeps of Twilio's body
    now: Callable[[], str]  # the journal's `at` for the events made
    tally: collections.Counter[str]
    note_broken: Callable[[Broken], None]  # a row that cannot be reconciled at all

    def listed(self, items: Iterable[object], known: dict[str, Known],
               parse: Parse) -> list[Event]:
        """The events for a batch of listed items (JSON values, or rows already `Broken`);
        `known` is the store's messages, by SID; `parse` reads an item into a row."""
        events: list[Event] = []
        handled: set[str] = set()  # SIDs the store did not know, journaled by this call
        for item in items:
            self.tally["listed"] += 1
            found = _known_of(item, known)
            if found is not None and self._settled(item, found):  # most rows of most days
                self.seen.add(found.id)
                self.tally["unchanged"] += 1
                continue
            row = item if isinstance(item, Broken) else parse(item)
            if isinstance(row, Broken):
                self.note_broken(row)
            elif row.sid in handled:  # twice in one batch: once is enough
                self.tally["listed_twice"] += 1
            else:
                if row.sid not in known:
                    handled.add(row.sid)
                events += self._compare(row, known)
        return events

    def _settled(self, item: object, found: Known) -> bool:
        """Whether the item, read as little as possible, is a message of the day the
        store already holds as Twilio has it: one the full reading would find
        `unchanged`. Only when every field it looks at has Twilio's own form."""
        assert isinstance(item, dict)
        status = item.get("status")
        return (status.__class__ is str and not found.flags & _GONE
                and not _is_news(status, found.status, found.terminals)
                and self.day.exactly_on(item.get("date_sent") or item.get("date_created")))

    def _compare(self, row: Listed, known: dict[str, Known]) -> list[Event]:
        if not self.day.holds(row.date_sent or row.date_created):
            self.tally["other_day"] += 1
            return []
        if row.problems:
            self.tally["read_in_part"] += 1
        found = known.get(row.sid)
        if found is not None:
            self.seen.add(found.id)
            return self._known(row, found)
        return self._unknown(row)

    def created_before_candidates(self, items: Iterable[object], known: dict[str, Known],
                                  parse: Parse) -> list[str]:
        """The `date_created` of each listed message the store does not know that was
        created before the sends held as candidates (queued, or scheduled, at Twilio for
        long before it was sent): the sends of those times must be asked for too."""
        found = []
        for item in items:
            sid = sid_of(item)
            if sid is None or sid in known:
                continue
            # Created on the day itself, in Twilio's form: among the candidates, no need to
            # read the row (the comparison will, once).
            if isinstance(item, dict) and self.day.exactly_on(item.get("date_created")):
                continue
            row = parse(item)
            if (isinstance(row, Listed) and row.date_created is not None
                    and row.date_created < self.candidates.since):
                found.append(row.date_created)
        return found

    def unlisted(self, batch: Iterable[DayMessage]) -> list[DayMessage]:
        """The day's messages with a SID the listing did not name: to fetch by SID."""
        return [m for m in batch if m.sid is not None and m.id not in self.seen
                and not self.seen.began_after(m.id)]

    def after_fetch(self, message: DayMessage, answer: Fetched) -> list[Event]:
        """The event for an unlisted message once fetched: found (perhaps a newer status),
        or 404, `missing_at_twilio`. Another 4xx says nothing about it."""
        assert message.sid is not None
        self.tally["fetched_unlisted"] += 1
        if answer.http_status == 404:
            if MISSING in message.flags:
                return []
            self.tally[MISSING] += 1
            return [self._event("reconciled", sid=message.sid, data={
                "flags": [MISSING], "http_status": 404, "error_code": answer.error_code})]
        if answer.http_status != 200:
            self.tally["fetch_refused"] += 1
            return []
        status = answer.status
        newer = status is not None and _is_news(status, message.status, frozenset())
        if not newer and not message.flags & _GONE:
            return []
        self.tally["updated" if newer else "found_again"] += 1
        return [self._event("reconciled", sid=message.sid, status=status if newer else None,
                            data={**answer.resource, "found": True, "via": "fetch"})]

    def unmatched(self) -> list[Event]:
        """`not_created` for each of the day's unknown sends that nothing matched; only once
        the listing is whole and the day (and its match window) is over."""
        events = []
        for send in self.candidates.all():
            if (send.ref in self.candidates.matched or send.ref in self.candidates.ambiguous
                    or not self.day.holds(send.created_at)
                    or send.flags & {NOT_CREATED, AMBIGUOUS}):
                continue
            self.tally[NOT_CREATED] += 1
            events.append(self._event("reconciled", ref=send.ref, data={"flags": [NOT_CREATED]}))
        return events

    # --- one listed message

    def _known(self, row: Listed, found: Known) -> list[Event]:
        newer = row.status is not None and _is_news(row.status, found.status, found.terminals)
        if not newer and not found.flags & _GONE:
            self.tally["unchanged"] += 1
            return []
        self.tally["updated" if newer else "found_again"] += 1
        return [self._event("reconciled", sid=row.sid, status=row.status if newer else None,
                            data={**row.reported(), "found": True})]

    def _unknown(self, row: Listed) -> list[Event]:
        if not row.outbound:
            return [self._imported(row, [IMPORTED, MISSED_WEBHOOK])]
        candidates = self.candidates.of(row)
        if len(candidates) == 1 and candidates[0].ref not in self.candidates.ambiguous:
            [send] = candidates
            self.candidates.matched.add(send.ref)
            self.seen.add(send.id)
            self.tally["sid_matched"] += 1
            return [self._event("sid_matched", sid=row.sid, ref=send.ref, status=row.status,
                                data={**row.reported(), "found": True})]
        flags = [IMPORTED]
        events = []
        if candidates:
            flags.append(AMBIGUOUS)
            for send in candidates:
                if send.ref not in self.candidates.ambiguous:
                    self.candidates.ambiguous.add(send.ref)
                    events.append(self._event("reconciled", ref=send.ref, data={
                        "flags": [AMBIGUOUS], "listed_sid": row.sid}))
        extra = {"candidates": sorted(send.ref for send in candidates)} if candidates else {}
        events.insert(0, self._imported(row, flags, **extra))
        return events

    def _imported(self, row: Listed, flags: list[str], **extra: Any) -> Event:
        """The event that brings a listed message the store never had into the record."""
        for flag in flags:
            self.tally[flag] += 1
        data = {**row.reported(), **self._body(row.body), "flags": flags, "found": True,
                **extra}
        return self._event("reconciled", sid=row.sid, status=row.status, data=data)

    def _body(self, body: str | None) -> dict[str, Any]:
        if not body:
            return {}
        kept: dict[str, Any] = {"body_sha256": hashlib.sha256(body.encode()).hexdigest()}
        if self.keep_body == "full":
            kept["body"] = body
        return kept

    def _event(self, kind: Any, *, sid: str | None = None, ref: str | None = None,
               status: str | None = None, data: dict[str, Any]) -> Event:
        return Event(kind, "reconcile", self.now(), sid=sid, ref=ref, status=status,
                     data={**data, "run_id": self.run_id})


def _known_of(item: object, known: dict[str, Known]) -> Known | None:
    sid = sid_of(item)
    return known.get(sid) if sid is not None and SID.fullmatch(sid) else None


def _is_news(twilio: str, ours: str | None, terminals: frozenset[str]) -> bool:
    """Whether Twilio's status changes the record: it ranks higher than ours, or it is a
    terminal status the record has not seen (a conflict, flagged by the fold)."""
    if ours is None or rank(twilio) > rank(ours):
        return True
    return (rank(twilio) == TERMINAL_RANK and twilio != ours and twilio not in terminals)


def _same_to(listed: str, ours: str | None) -> bool:
    if ours is None:
        return False
    if listed.endswith("XXXX"):
        return len(listed) == len(ours) and listed[:-4] == ours[:-4]
    return listed == ours


def _same_sender(listed: Listed, send: UnknownSend) -> bool:
    if send.messaging_service_sid is not None:
        return listed.messaging_service_sid == send.messaging_service_sid
    return send.from_ is not None and listed.from_ == send.from_


def _same_body(listed: Listed, send: UnknownSend) -> bool:
    """Compared only when both sides have one: Twilio may have redacted its copy."""
    if not listed.body or send.body_sha256 is None:
        return True
    return hashlib.sha256(listed.body.encode()).hexdigest() == send.body_sha256


def _timestamp(moment: str) -> float:
    parsed = dt.datetime.fromisoformat(moment)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
