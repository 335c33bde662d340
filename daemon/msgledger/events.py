"""The events that flow into the journal, and the channel types that carry them.

Every producer (webhook receiver, sender, poller, reconciler) builds an `Event` and hands it
to the journal actor through its `JournalClient` (`journal_client.py`), as a `Submission`
with a one-slot `Reply`. The journal answers it
with the event's sequence number once it is committed, or with the error that
stopped the commit. Events carry their own identifiers: context variables do not cross a
channel, so each consumer binds its log context from the event itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import outcome
import trio

Kind: TypeAlias = Literal[
    "callback",  # a status callback Twilio posted to /twilio/status
    "debugger",  # a Debugger alert posted to /twilio/debugger
    "send_requested",  # written before the Twilio API is called
    "send_accepted",  # Twilio created the message: SID and initial status
    "send_rejected",  # Twilio refused the create: an unsuccessful attempt
    "send_unknown",  # the request left but no answer came back
    "register",  # an app recorded a message it sent itself
    "polled",  # the poller fetched the message by SID: Twilio's answer (a status, or 404)
    "poll_gave_up",  # still not final at poller.give_up_after: flagged unconfirmed
    "reconciled",  # the reconciler's finding about one message: Twilio's status, a flag
    "sid_matched",  # the reconciler gave a send whose outcome was unknown its SID
    "reconcile_started",  # a reconcile run began (no message: journal only)
    "reconcile_export_job",  # a run's Bulk Export job, so that a restart picks it up
    "reconcile_run",  # a run ended: its report (no message: journal only)
    "inbound_received",  # a message reached the firm: Twilio's webhook, every parameter
    "inbound_forward_failed",  # the firm's app did not answer usable TwiML: why
    "media_archived",  # a media file was fetched: its type, size and SHA-256 (bytes apart)
    "media_failed",  # a media file could not be fetched this time: why, and when again
]

Source: TypeAlias = Literal["api", "callback", "poll", "reconcile", "debugger", "register",
                            "inbound", "media"]


def utc_now() -> str:
    """The current time as the journal writes it: ISO 8601, UTC, microseconds."""
    return iso_utc(dt.datetime.now(dt.UTC))


def iso_utc(moment: dt.datetime) -> str:
    """`moment` (aware) as the journal writes times: ISO 8601, UTC, microseconds."""
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Event:
    """One fact about one message, exactly as it was observed.

    `sid`, `ref` and `status` are lifted out of `data` so the store can index them; `data`
    holds everything the event carried, verbatim, and must be JSON-serialisable. `blob` is
    a media file's bytes (`media_archived`): stored beside the journal, where a purge can
    erase them, and never part of the hashed row, which holds their SHA-256.
    """

    kind: Kind
    source: Source
    at: str
    sid: str | None = None
    ref: str | None = None
    status: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    blob: bytes | None = field(default=None, repr=False)


class JournalUnavailable(Exception):
    """The journal could not make an event durable (disk full, read-only store...)."""


# What the journal answers on a reply channel: the committed sequence number, or why not.
Ack: TypeAlias = int | JournalUnavailable


class Reply:
    """The journal's one answer to one producer: a future for the event's sequence number.

    A one-slot reply channel, made lean: a memory channel pair per event cost the event
    loop far more CPU per handoff than this future (bench/README.md, "handoff"). The
    journal answers from the Trio thread; a producer that gave up waiting is simply not
    woken, and its event is kept all the same.
    """

    __slots__ = ("_ack", "_task")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._ack: Ack | None = None

    @property
    def answered(self) -> bool:
        return self._ack is not None

    def answer(self, ack: Ack) -> None:
        """Give the answer; wakes the waiting producer, if it still waits. The first answer
        stands: once a producer is told 503 it must not later report 200."""
        if self._ack is not None:
            return
        task, self._task, self._ack = self._task, None, ack
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Value(ack))

    async def wait(self) -> Ack:
        """The answer, once the journal gives it. A checkpoint, like any trio wait."""
        if self._ack is not None:
            await trio.lowlevel.checkpoint()
            return self._ack
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        ack: Ack = await trio.lowlevel.wait_task_rescheduled(abort)
        return ack


@dataclass(frozen=True, slots=True)
class Submission:
    """An event plus the reply on which the journal answers for it."""

    event: Event
    reply: Reply


JournalInbox: TypeAlias = trio.MemoryReceiveChannel[Submission]
JournalIntake: TypeAlias = trio.MemorySendChannel[Submission]


def take_waiting(inbox: JournalInbox, first: Submission, most: int) -> list[Submission]:
    """`first` and whatever else waits in `inbox` now, at most `most` in all: one batch."""
    batch = [first]
    while len(batch) < most:
        try:
            batch.append(inbox.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return batch
