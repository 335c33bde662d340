"""The events that flow into the journal, and the channel types that carry them.

Every producer (webhook receiver, sender, poller, reconciler) builds an `Event` and hands it
to the journal actor as a `Submission` with a one-slot reply channel. The journal answers
that channel with the event's sequence number once it is committed, or with the error that
stopped the commit. Events carry their own identifiers: context variables do not cross a
channel, so each consumer binds its log context from the event itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import trio

Kind: TypeAlias = Literal[
    "callback",  # a status callback Twilio posted to /twilio/status
    "debugger",  # a Debugger alert posted to /twilio/debugger
    "send_requested",  # written before the Twilio API is called
    "send_accepted",  # Twilio created the message: SID and initial status
    "send_rejected",  # Twilio refused the create: an unsuccessful attempt
    "send_unknown",  # the request left but no answer came back
    "register",  # an app recorded a message it sent itself
    "poll",  # a fetch by SID found this status
    "reconcile",  # the daily list found this status or this discrepancy
]

Source: TypeAlias = Literal["api", "callback", "poll", "reconcile", "debugger", "register"]


def utc_now() -> str:
    """The current time as the journal writes it: ISO 8601, UTC, microseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Event:
    """One fact about one message, exactly as it was observed.

    `sid`, `ref` and `status` are lifted out of `data` so the store can index them; `data`
    holds everything the event carried, verbatim, and must be JSON-serialisable.
    """

    kind: Kind
    source: Source
    at: str
    sid: str | None = None
    ref: str | None = None
    status: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


class JournalUnavailable(Exception):
    """The journal could not make an event durable (disk full, read-only store...)."""


# What the journal answers on a reply channel: the committed sequence number, or why not.
Ack: TypeAlias = int | JournalUnavailable


@dataclass(frozen=True, slots=True)
class Submission:
    """An event plus the one-slot channel on which the journal answers for it."""

    event: Event
    reply: trio.MemorySendChannel[Ack]


JournalInbox: TypeAlias = trio.MemoryReceiveChannel[Submission]
JournalIntake: TypeAlias = trio.MemorySendChannel[Submission]


async def journal(intake: JournalIntake, event: Event) -> Ack:
    """Hand `event` to the journal and wait for its answer.

    The caller bounds the wait (`trio.move_on_after`); a closed journal answers
    `JournalUnavailable` rather than raising, so every producer handles one outcome type.
    """
    reply_send, reply_receive = trio.open_memory_channel[Ack](1)  # one answer per event
    try:
        await intake.send(Submission(event, reply_send))
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        return JournalUnavailable("journal is closed")
    with reply_receive:
        try:
            return await reply_receive.receive()
        except trio.EndOfChannel:
            return JournalUnavailable("journal stopped before answering")


async def journal_within(intake: JournalIntake, event: Event, seconds: float, *,
                         shield: bool = False) -> Ack:
    """`journal`, waiting at most `seconds`: running out is an answer (JournalUnavailable,
    a 503 to the caller), not an exception, so every producer handles one outcome type.
    `shield` keeps a shutdown from abandoning an event whose outcome must be recorded."""
    with trio.move_on_after(seconds, shield=shield):
        return await journal(intake, event)
    return JournalUnavailable("journal not durable in time")
