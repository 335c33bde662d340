"""The journal actor: the only writer of the store.

Consumes `Submission`s from its inbox, commits them in groups (one transaction and one
fsync for every event waiting), and answers each submission's reply with the
event's sequence number, or with `JournalUnavailable` when the commit failed. A failed
commit does not end the actor: it logs loudly, answers 503-worthy errors, and tries again
with the next batch, so the daemon recovers by itself when the disk does. Ends when every
producer has closed its clone of the intake channel and the inbox is drained.

After each batch it tells `health` whether the store commits: None once a commit succeeds,
the reason when the store could not commit at all (a batch refused only for its content
says nothing). A store removed or replaced under the writer (StoreLost) fails every batch
from then on, and is logged once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial

import trio

from .events import Ack, JournalInbox, JournalUnavailable, Submission, take_waiting
from .logs import get_logger
from .metrics import Metrics
from .store import JournalWriter, StoreLost
from .store_reads import RunSync

MAX_BATCH = 1024  # events per transaction: bounds one commit's latency, far above the load
# Events waiting for the journal (or a front's forwarder): a full batch's worth can queue
# while the previous one commits; beyond that producers wait, the backpressure that keeps
# memory flat.
INTAKE_BUFFER = MAX_BATCH
log = get_logger("msgledger.journal")
Health = Callable[[str | None], None]  # why the store cannot commit now, or None if it can


class StoreFailing(JournalUnavailable):
    """The store could not commit at all, whatever the events: /healthz says so too."""


def _nobody(_: str | None) -> None:
    """Health reported to no one (a journal run without an HTTP front: tests, bench)."""


async def run_journal(inbox: JournalInbox, *, writer: JournalWriter, metrics: Metrics,
                      health: Health = _nobody, run_sync: RunSync = trio.to_thread.run_sync,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Commit everything the inbox delivers, in batches, until the inbox is closed. Each
    commit runs through `run_sync` (a worker thread)."""
    limiter = trio.CapacityLimiter(1)  # SQLite has one owner: one thread at a time
    with inbox:
        task_status.started()
        async for first in inbox:
            batch = take_waiting(inbox, first, MAX_BATCH)
            await _commit(batch, writer, partial(run_sync, limiter=limiter), metrics, health)
    log.info("journal_closed", last_seq=writer.last_seq,
             refused_batches=writer.refused_batches)


async def _commit(batch: Sequence[Submission], writer: JournalWriter, run_sync: RunSync,
                  metrics: Metrics, health: Health) -> None:
    started = time.perf_counter()
    acks: list[Ack] = await run_sync(partial(_append_or_isolate, writer, batch))
    metrics.commit_seconds.observe(time.perf_counter() - started)
    metrics.batch_size.observe(len(batch))
    _report(acks, health)  # first: a client told 503 then probing /healthz hears why
    for submission, ack in zip(batch, acks, strict=True):
        _answer(submission, ack)


def _report(acks: Sequence[Ack], health: Health) -> None:
    """None if anything committed; the store's failure if the batch met one."""
    if any(isinstance(ack, int) for ack in acks):  # the first ack, nearly always
        health(None)
        return
    failing = next((ack for ack in acks if isinstance(ack, StoreFailing)), None)
    if failing is not None:
        health(str(failing))


def _append_or_isolate(writer: JournalWriter, batch: Sequence[Submission]) -> list[Ack]:
    """Commit the batch at once. If something in it made that fail (a constraint, text that
    cannot be encoded, a value SQLite cannot hold), commit each event alone, so a bad one
    answers for itself and not for its whole batch. A store that cannot write at all (busy,
    full, read-only, I/O) fails the batch as it is: trying each event alone would only hold
    the journal up N times as long."""
    try:
        return list(writer.append([s.event for s in batch]))
    except (sqlite3.OperationalError, StoreLost) as error:
        return [_store_failed(error, len(batch))] * len(batch)
    except Exception as error:  # the batch's content: isolate it
        if len(batch) == 1:
            return [_refused(batch[0], error)]
        log.error("journal_batch_failed", error=_describe(error), events=len(batch))
    return [_append_one(writer, s) for s in batch]


def _append_one(writer: JournalWriter, submission: Submission) -> Ack:
    try:
        return writer.append([submission.event])[0]
    except (sqlite3.OperationalError, StoreLost) as error:
        return _store_failed(error, 1)
    except Exception as error:  # this event's own content: it alone fails
        return _refused(submission, error)


def _store_failed(error: sqlite3.OperationalError | StoreLost, events: int) -> StoreFailing:
    """A store that cannot commit: the batch fails as it is, and the log says why. A lost
    store is logged once: every batch after it fails the same way, many a second under load
    (`writer.refused_batches` counts them)."""
    if isinstance(error, StoreLost):
        if error.first:
            log.error("store_lost", error=str(error), events=events)
    else:
        log.error("journal_commit_failed", error=str(error), events=events)
    return StoreFailing(str(error))


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
