"""The rules that turn a message's events into its current state (docs/design.md, "Status rules").

A pure fold: `apply(state, event)` never looks at anything but its arguments, so the
stored projection can always be rebuilt by replaying the journal, and the rules can be
tested as properties. The status never goes backwards: it is the highest-ranked one seen,
and it, its error code, its flags and the times do not depend on the order the events
arrived in. Descriptive fields (to, from, body) keep the first value seen.

The poll schedule folds the same way: `polls` counts the poller's answers, `next_poll_at`
is the latest time any of them set, and `poll_from` (derived) is when the message's age
counts from while the poller may poll it. Flags withdrawn by later evidence:
`unconfirmed` (the poller gave up) by any final status, and `not_created` (the reconciler
found no trace of a send) once the message has a SID, whatever the order; and
`not_found_at_twilio` (a poll's 404) and `missing_at_twilio` (the reconciler's) by a later
answer that found the message (a poll's 200, a reconcile that listed or fetched it), in
journal order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..events import Event
from ._fold_media import NO_MEDIA, MediaItem, fold_media

# Twilio's lifecycle ranks (docs/twilio.md, "How msgledger ranks statuses"). A late lower
# status is journaled, never applied.
RANK: dict[str, int] = {
    "accepted": 1, "scheduled": 1,
    "queued": 2,
    "sending": 3,
    "sent": 4,
    "delivered": 5, "undelivered": 5, "failed": 5, "canceled": 5,
    "read": 6,
    # An inbound message's only two (docs/twilio.md, "Inbound messages"): received is final.
    "receiving": 2, "received": 5,
}
# msgledger's own statuses for a send Twilio has not answered; any Twilio status beats them.
LOCAL_RANK: dict[str, int] = {"requested": 0, "outcome_unknown": 0, "rejected": 0}
UNKNOWN_RANK = -1  # unknown statuses are kept in the history but never beat a known one
TERMINAL_RANK = 5
FINAL = frozenset({"delivered", "undelivered", "failed", "canceled", "read", "received"})
# Nothing more will happen to these: Twilio's final statuses, and a send Twilio refused.
SETTLED = FINAL | {"rejected"}

# Ties between different statuses of one rank are broken by a fixed order so that the
# result never depends on arrival order. Among terminal statuses a delivery receipt is the
# strongest evidence; such a tie also raises `status_conflict` for a human to look at.
_TIE_ORDER: dict[str, int] = {
    "scheduled": 0, "accepted": 1,
    "requested": 0, "outcome_unknown": 1, "rejected": 2,
    "canceled": 0, "failed": 1, "undelivered": 2, "delivered": 3, "received": 4,
}

# Twilio's callback parameter names -> the record's field names.
_CALLBACK_FIELDS = {"To": "to", "From": "from", "MessagingServiceSid": "messaging_service_sid",
                    "ErrorCode": "error_code"}
# An inbound webhook's: its Body is the message's, and an ErrorCode is the fallback's
# (why Twilio could not reach the primary URL), not the message's.
_INBOUND_FIELDS = {"To": "to", "From": "from", "MessagingServiceSid": "messaging_service_sid",
                   "Body": "body"}
_FIELDS = ("to", "from", "messaging_service_sid", "body", "body_sha256")
INBOUND = "inbound"
OUTBOUND_API = "outbound-api"  # what Twilio calls a message created through its API
# The kinds that make a message ours to send (when their data names no other direction).
_SENDS = frozenset({"send_requested", "send_accepted", "send_rejected", "send_unknown",
                    "register"})
_NO_FLAGS: frozenset[str] = frozenset()
NOT_FOUND = "not_found_at_twilio"  # the last poll was answered 404
UNCONFIRMED = "unconfirmed"  # the poller gave up before any final status
MISSING = "missing_at_twilio"  # the reconciler: not listed, and its fetch answered 404
NOT_CREATED = "not_created"  # the reconciler: a send of unknown outcome Twilio never had
_GONE = frozenset({NOT_FOUND, MISSING})  # withdrawn by an answer that found the message
# The reconciler's events about a listed message: its `date_created` and `date_sent` are
# Twilio's, and date the record (so an import counts for the day Twilio sent it).
_TWILIO_DATED = frozenset({"reconciled", "sid_matched"})
_JOURNAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")


def rank(status: str) -> int:
    return RANK.get(status, LOCAL_RANK.get(status, UNKNOWN_RANK))


def status_key(status: str) -> tuple[int, int, str]:
    """Sort key: the projection's status is the maximum of this over every status seen."""
    return rank(status), _TIE_ORDER.get(status, 0), status


@dataclass(frozen=True, slots=True)
class MessageState:
    """The current state of one message: what `messages` stores for it."""

    sid: str | None = None
    ref: str | None = None
    to: str | None = None
    from_: str | None = None
    messaging_service_sid: str | None = None
    body: str | None = None
    body_sha256: str | None = None
    status: str | None = None
    error_code: str | None = None
    terminals: frozenset[str] = frozenset()  # terminal statuses seen, for status_conflict
    flags: frozenset[str] = frozenset()
    created_at: str = ""
    updated_at: str = ""
    sent_at: str | None = None  # first time Twilio had it; the poller measures age from here
    polls: int = 0  # `polled` events: Twilio's answers to the poller
    next_poll_at: str | None = None  # when the poller asks again, as its last answer set
    direction: str | None = None  # Twilio's: outbound-api, outbound-reply, inbound...
    in_reply_to: str | None = None  # the SID of the message this one answers
    received_at: str | None = None  # when its inbound webhook was first journaled
    media: tuple[MediaItem, ...] = NO_MEDIA


def facts(event: Event) -> dict[str, str]:
    """The record fields an event states, whatever shape its data has."""
    data: Mapping[str, Any] = event.data
    found: dict[str, str] = {}
    if "params" in data:  # a Twilio webhook: verbatim form pairs
        names = _INBOUND_FIELDS if event.kind == "inbound_received" else _CALLBACK_FIELDS
        for name, value in data["params"]:
            field_name = names.get(name)
            if field_name and value != "" and field_name not in found:
                found[field_name] = value
        if isinstance(data.get("body_sha256"), str):
            found["body_sha256"] = data["body_sha256"]
    else:
        for name in (*_FIELDS, "error_code"):
            value = data.get(name)
            if value is not None and value != "":
                found[name] = str(value)
    return found


def apply(state: MessageState | None, event: Event) -> MessageState:
    """The state after `event`; `state` is None for a message's first event.

    Builds the new state in one constructor call: this runs once per journaled event on the
    journal's thread, where a `dataclasses.replace` per field group was most of its cost.
    """
    s = state or MessageState(created_at=event.at, updated_at=event.at)
    if event.kind == "inbound_received" and s.received_at is not None:
        return s  # the same message again (a retry, the fallback): journaled, nothing more
    found = facts(event)
    flags = s.flags | _flags_from(event)
    status, error_code, terminals, sent_at = s.status, s.error_code, s.terminals, s.sent_at
    polls, next_poll_at = s.polls, s.next_poll_at
    if event.kind == "polled":
        polls, next_poll_at = polls + 1, _latest(next_poll_at, event.data.get("next_poll_at"))
        flags = _not_found(flags, event.data.get("http_status"))
    elif event.kind == "poll_gave_up":
        flags = flags | {UNCONFIRMED}
    elif event.kind in ("reconciled", "sid_matched") and event.data.get("found") is True:
        flags = flags - _GONE
    created_at = min(s.created_at, event.at)
    if event.kind in _TWILIO_DATED:  # what Twilio listed: its own times, not the run's
        created_at = _earliest(created_at, event.data.get("date_created")) or created_at
        sent_at = _earliest(sent_at, event.data.get("date_sent"))
    if event.status is not None:
        new = event.status
        if rank(new) >= 1:
            sent_at = event.at if sent_at is None else min(sent_at, event.at)
        if rank(new) == TERMINAL_RANK and new not in terminals:
            terminals = terminals | {new}
            if len(terminals) > 1:
                flags = flags | {"status_conflict"}
        if status is None or status_key(new) > status_key(status):
            status, error_code = new, found.get("error_code")
        elif new == status:  # a duplicate: its error code may fill in, never by arrival order
            error_code = _first_of(error_code, found.get("error_code"))
    if status in FINAL and UNCONFIRMED in flags:
        flags = flags - {UNCONFIRMED}
    sid = s.sid or event.sid
    received_at = s.received_at
    if event.kind == "inbound_received":
        received_at = event.at
    if sid is not None and NOT_CREATED in flags:
        flags = flags - {NOT_CREATED}
    return MessageState(
        sid=sid,
        ref=s.ref or event.ref,
        to=s.to or found.get("to"),
        from_=s.from_ or found.get("from"),
        messaging_service_sid=s.messaging_service_sid or found.get("messaging_service_sid"),
        body=s.body or found.get("body"),
        body_sha256=s.body_sha256 or found.get("body_sha256"),
        status=status,
        error_code=error_code,
        terminals=terminals,
        flags=flags,
        created_at=created_at,
        updated_at=max(s.updated_at, event.at),
        sent_at=sent_at,
        polls=polls,
        next_poll_at=next_poll_at,
        direction=s.direction or _direction(event),
        in_reply_to=s.in_reply_to or _in_reply_to(event),
        received_at=received_at,
        media=fold_media(s.media, event),
    )


def _direction(event: Event) -> str | None:
    """The direction an event states: its data's (Twilio's, or a reply's), else what its
    kind implies."""
    stated = event.data.get("direction")
    if isinstance(stated, str) and stated:
        return stated
    if event.kind == "inbound_received":
        return INBOUND
    return OUTBOUND_API if event.kind in _SENDS else None


def _in_reply_to(event: Event) -> str | None:
    """The message an event says this one answers: a reply's inbound message, or the
    `OriginalRepliedMessageSid` of an inbound webhook (a message sent in the last 7 days)."""
    linked = event.data.get("in_reply_to")
    return linked if isinstance(linked, str) and linked else None


def poll_from(state: MessageState) -> str | None:
    """When the message's age counts from while the poller may poll it (its `sent_at`, or
    its first event); None once it may not: no SID, a final status, or given up."""
    if (state.sid is None or state.status in FINAL or UNCONFIRMED in state.flags
            or state.direction == INBOUND or state.status == "receiving"):
        return None
    return state.sent_at or state.created_at


def _earliest(current: str | None, proposed: object) -> str | None:
    """The earlier of two times, ignoring a missing one: the same in any order. Only the
    journal's own form counts (ISO 8601, UTC, microseconds, as `rows` writes them)."""
    if not isinstance(proposed, str) or not _JOURNAL_TIME.fullmatch(proposed):
        return current
    return proposed if current is None else min(current, proposed)


def _latest(current: str | None, proposed: object) -> str | None:
    """The later of two poll times, ignoring a missing or malformed one: the same in any
    order."""
    if not isinstance(proposed, str):
        return current
    return proposed if current is None else max(current, proposed)


def _not_found(flags: frozenset[str], http_status: object) -> frozenset[str]:
    """A poll's answer on `not_found_at_twilio`: a 404 raises it, finding the message
    withdraws it (and the reconciler's `missing_at_twilio`), any other answer leaves it be."""
    if http_status == 404:
        return flags | {NOT_FOUND}
    if http_status == 200 and flags & _GONE:
        return flags - _GONE
    return flags


def _first_of(a: str | None, b: str | None) -> str | None:
    """The smaller of two error codes, ignoring None: the same answer in any order."""
    return min((c for c in (a, b) if c is not None), default=None)


def _flags_from(event: Event) -> frozenset[str]:
    flags = event.data.get("flags")
    if not flags or not isinstance(flags, list | tuple):
        return _NO_FLAGS
    return frozenset(str(f) for f in flags)
