"""The events that flow into the journal, and the channel types that carry them.

Every producer (webhook receiver, sender, poller, reconciler) builds an `Event` and hands it
to the journal actor as a `Submission` with a one-slot `Reply`. The journal answers it
with the event's sequence number once it is committed, or with the error that
stopped the commit. Events carry their own identifiers: context variables do not cross a
channel, so each consumer binds its log context from the event itself.
"""

from __future__ import annotations

import datetime as dt
import math
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


class Reply:
    """The journal's one answer to one producer: a future for the event's sequence number.

    STYLE.md's one-slot reply channel, made lean: a memory channel pair per event made a
    handoff cost 71 µs of the event loop's CPU against 30 with this future, both inside a
    cancel scope (`bench/handoff.py`). The journal answers from the Trio thread; a
    producer that gave up waiting is simply not woken, and its event is kept all the same.
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
# Events waiting for the journal (or a front's forwarder). A full batch's worth can queue
# while the previous one commits; beyond that producers wait, which is the backpressure
# that keeps memory flat.
INTAKE_BUFFER = 1024


async def journal(intake: JournalIntake, event: Event) -> Ack:
    """Hand `event` to the journal and wait for its answer.

    The caller bounds the wait (`trio.move_on_after`); a closed journal answers
    `JournalUnavailable` rather than raising, so every producer handles one outcome type.
    """
    return await submit(intake, event, Reply())


async def submit(intake: JournalIntake, event: Event, reply: Reply,
                 handed_by: float = math.inf) -> Ack:
    """`journal` with the caller's own `reply` (see `deadlines.AckDeadlines`).

    A full intake pushes back on the producer until the Trio time `handed_by`; a producer
    that could not hand its event over by then, or found the journal closed, gets its
    answer (JournalUnavailable) on the reply too, so nothing else waits for it.
    """
    await hand_over(intake, Submission(event, reply), handed_by)
    return await reply.wait()


async def hand_over(intake: JournalIntake, submission: Submission,
                    handed_by: float = math.inf) -> None:
    """Put `submission` in the intake without waiting for its answer. A full intake pushes
    back until the Trio time `handed_by`; past it, or with the journal closed, the reply is
    answered JournalUnavailable here. Checkpoints only when it has to wait for room."""
    try:
        intake.send_nowait(submission)  # the usual case
    except trio.WouldBlock:
        refused = await _send_by(intake, submission, handed_by)
        if refused is not None:
            submission.reply.answer(refused)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        submission.reply.answer(JournalUnavailable("journal is closed"))


async def _send_by(intake: JournalIntake, submission: Submission,
                   deadline: float) -> JournalUnavailable | None:
    """Send, waiting for room until `deadline`; None once sent, else why not."""
    with trio.move_on_at(deadline):
        try:
            await intake.send(submission)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return JournalUnavailable("journal is closed")
        return None
    return JournalUnavailable("journal not durable in time")


async def journal_within(intake: JournalIntake, event: Event, seconds: float, *,
                         shield: bool = False) -> Ack:
    """`journal`, waiting at most `seconds`: running out is an answer (JournalUnavailable,
    a 503 to the caller), not an exception, so every producer handles one outcome type.
    `shield` keeps a shutdown from abandoning an event whose outcome must be recorded."""
    with trio.move_on_after(seconds, shield=shield):
        return await journal(intake, event)
    return JournalUnavailable("journal not durable in time")


def take_waiting(inbox: JournalInbox, first: Submission, most: int) -> list[Submission]:
    """`first` and whatever else waits in `inbox` now, at most `most` in all: one batch."""
    batch = [first]
    while len(batch) < most:
        try:
            batch.append(inbox.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return batch
