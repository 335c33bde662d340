"""How every producer hands its events to the journal: one `JournalClient`, one bound.

Every producer holds one: the webhook receivers, the sender, register, the fronts' link
(and next the poller and the reconciler). Each wait for the journal's answer is bounded by
`http.ack_timeout`; running out is an answer (JournalUnavailable, a 503 to the caller), not
an exception, and so is a closed journal: every producer handles one outcome type. There
are two ways in:

- `journal(event)`: wait for the answer. Every such wait shares one timer, the deadline
  queue (`deadlines.AckDeadlines`), instead of a cancel scope each: on the hot path the
  scope was most of what a handoff cost (bench/README.md, "handoff"). `enqueue` is the same
  way split in two, for a producer that hands over many events before it waits on any (the
  fronts' link).
- `journal_shielded(event)`: the same bound, but a shutdown does not cut the wait short:
  for an outcome that must be recorded (the sender's, once Twilio has been called).

A full intake pushes back on the producer until its deadline: the backpressure that keeps
memory flat. The deadline queue's `run` must be running while anyone waits; the process's
wiring starts it (`main.py`, and each front).
"""

from __future__ import annotations

import math
from types import TracebackType

import trio

from .deadlines import AckDeadlines
from .events import Ack, Event, JournalIntake, JournalUnavailable, Reply, Submission


class JournalClient:
    """One producer's way to the journal: its own clone of the intake, and the shared
    deadline queue. Close it (or use it as a context manager) when the producer is done:
    the journal ends once every clone is closed."""

    def __init__(self, intake: JournalIntake, deadlines: AckDeadlines) -> None:
        self._intake = intake
        self._deadlines = deadlines

    @property
    def timeout(self) -> float:
        """Seconds each wait is bounded by (`http.ack_timeout`)."""
        return self._deadlines.seconds

    def clone(self) -> JournalClient:
        """A client of its own for another producer (another intake clone)."""
        return JournalClient(self._intake.clone(), self._deadlines)

    def close(self) -> None:
        self._intake.close()

    def __enter__(self) -> JournalClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    async def journal(self, event: Event) -> Ack:
        """Hand `event` to the journal; its sequence number once committed, or
        JournalUnavailable (not committed in time, or the journal is closed)."""
        return await (await self.enqueue(event)).wait()

    async def enqueue(self, event: Event) -> Reply:
        """Hand `event` to the journal; the reply its answer comes on, answered
        JournalUnavailable by the deadline queue if the journal has not answered in time."""
        reply, deadline = Reply(), trio.current_time() + self._deadlines.seconds
        self._deadlines.watch(deadline, reply)
        await _hand_over(self._intake, Submission(event, reply), deadline)
        return reply

    async def journal_shielded(self, event: Event) -> Ack:
        """`journal`, but a shutdown's cancellation waits for it (within the same bound):
        the deadline queue may be stopping too, so this wait has a scope of its own."""
        with trio.move_on_after(self._deadlines.seconds, shield=True):
            reply = Reply()
            await _hand_over(self._intake, Submission(event, reply))
            return await reply.wait()
        return JournalUnavailable("journal not durable in time")


async def _hand_over(intake: JournalIntake, submission: Submission,
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
