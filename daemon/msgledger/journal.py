"""The journal actor: the only writer of the store.

Consumes `Submission`s from its inbox, commits them in groups (one transaction and one
fsync for every event waiting), and answers each submission's reply with the
event's sequence number, or with `JournalUnavailable` when the commit failed. A failed
commit does not end the actor: it logs loudly, answers 503-worthy errors, and tries again
with the next batch, so the daemon recovers by itself when the disk does. Ends when every
producer has closed its clone of the intake channel and the inbox is drained.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

import trio

from .deadlines import AckDeadlines
from .events import Ack, JournalInbox, JournalUnavailable, Submission, take_waiting
from .logs import get_logger
from .metrics import Metrics
from .store import JournalWriter

MAX_BATCH = 1024  # events per transaction: bounds one commit's latency, far above the load
log = get_logger("msgledger.journal")


async def run_journal(inbox: JournalInbox, *, writer: JournalWriter, metrics: Metrics,
                      deadlines: AckDeadlines,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Commit everything the inbox delivers, in batches, until the inbox is closed.

    Runs `deadlines` beside the loop, so a producer waiting through it hears within its
    ack timeout even while a commit is stuck on the disk.
    """
    limiter = trio.CapacityLimiter(1)  # SQLite has one owner: one thread at a time
    with inbox:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deadlines.run)
            task_status.started()
            async for first in inbox:
                batch = take_waiting(inbox, first, MAX_BATCH)
                await _commit(batch, writer, limiter, metrics)
            nursery.cancel_scope.cancel()  # every submission is answered: nobody waits
    log.info("journal_closed", last_seq=writer.last_seq)


async def _commit(batch: Sequence[Submission], writer: JournalWriter,
                  limiter: trio.CapacityLimiter, metrics: Metrics) -> None:
    started = time.perf_counter()
    acks = await trio.to_thread.run_sync(_append_or_isolate, writer, batch, limiter=limiter)
    metrics.commit_seconds.observe(time.perf_counter() - started)
    metrics.batch_size.observe(len(batch))
    for submission, ack in zip(batch, acks, strict=True):
        _answer(submission, ack)


def _append_or_isolate(writer: JournalWriter, batch: Sequence[Submission]) -> list[Ack]:
    """Commit the batch at once. If something in it made that fail (a constraint, text that
    cannot be encoded, a value SQLite cannot hold), commit each event alone, so a bad one
    answers for itself and not for its whole batch. A store that cannot write at all (busy,
    full, read-only, I/O) fails the batch as it is: trying each event alone would only hold
    the journal up N times as long."""
    try:
        return list(writer.append([s.event for s in batch]))
    except sqlite3.OperationalError as error:
        log.error("journal_commit_failed", error=str(error), events=len(batch))
        return [JournalUnavailable(str(error))] * len(batch)
    except Exception as error:  # the batch's content: isolate it
        if len(batch) == 1:
            return [_refused(batch[0], error)]
        log.error("journal_batch_failed", error=_describe(error), events=len(batch))
    return [_append_one(writer, s) for s in batch]


def _append_one(writer: JournalWriter, submission: Submission) -> Ack:
    try:
        return writer.append([submission.event])[0]
    except sqlite3.OperationalError as error:
        log.error("journal_commit_failed", error=str(error), events=1)
        return JournalUnavailable(str(error))
    except Exception as error:  # this event's own content: it alone fails
        return _refused(submission, error)


def _refused(submission: Submission, error: Exception) -> JournalUnavailable:
    event = submission.event
    log.error("journal_event_refused", error=_describe(error), kind=event.kind,
              source=event.source)
    return JournalUnavailable(f"event cannot be stored: {type(error).__name__}")


def _describe(error: Exception) -> str:
    """The error in one short line: its text may quote the event's (hostile) content."""
    return f"{type(error).__name__}: {str(error)[:200]}"


def _answer(submission: Submission, ack: Ack) -> None:
    submission.reply.answer(ack)  # a producer that gave up waiting is not woken; event kept
