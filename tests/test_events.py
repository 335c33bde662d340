"""The journal's reply future, and the producers' one way to the journal: `JournalClient`,
whose every wait is bounded by the deadline queue or, shielded, by a scope of its own."""

from __future__ import annotations

import trio
import trio.testing

from msgledger.deadlines import CHECK_EVERY, AckDeadlines
from msgledger.events import Ack, Event, JournalIntake, JournalUnavailable, Reply, Submission
from msgledger.journal_client import JournalClient

EVENT = Event("callback", "callback", "2024-05-01T10:00:00.000000+00:00", sid="SM1",
              status="sent")


async def test_answer_wakes_the_waiting_producer() -> None:
    """A producer waiting on its reply gets exactly the answer the journal gave, once it is
    given: not before (it was still waiting), and not never (the bound would fail)."""
    reply = Reply()
    got: list[object] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                got.append(await reply.wait())

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # still waiting: nothing answered yet
            reply.answer(42)
    assert got == [42]


async def test_answer_before_waiting_is_kept() -> None:
    """An answer given before the producer waits is returned at once, and the wait is still
    a checkpoint, as every trio wait is."""
    reply = Reply()
    reply.answer(7)
    with trio.testing.assert_checkpoints():
        assert await reply.wait() == 7


async def test_a_producer_that_gave_up_is_not_woken(autojump_clock: trio.abc.Clock) -> None:
    """The journal may answer after the producer's deadline passed: nothing breaks, and the
    answer is kept for anyone who asks again."""
    reply = Reply()
    with trio.move_on_after(1) as scope:
        await reply.wait()
    assert scope.cancelled_caught
    reply.answer(3)  # the journal committed the event later; no one to wake
    assert reply.answered
    assert await reply.wait() == 3


async def test_a_shielded_wait_answers_unavailable_at_its_bound(
        autojump_clock: trio.abc.Clock) -> None:
    """A journal that answers only after the bound ends a shielded wait with
    JournalUnavailable after exactly the bound, even with the caller cancelled meanwhile
    (a shutdown). The journal answers a second late rather than never: no deadline of the
    test reaches through the shield, so a wait left unbounded must fail here (it gets the
    late answer) instead of hanging."""
    intake, inbox = trio.open_memory_channel[Submission](1)
    handed: list[Event] = []

    async def late_journal() -> None:
        submission = await inbox.receive()
        handed.append(submission.event)
        await trio.sleep(6.0)
        submission.reply.answer(1)

    ack: Ack | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_journal)
        started = trio.current_time()
        with trio.CancelScope() as shutdown:
            shutdown.cancel()  # already cancelled: the shield must still let it finish
            ack = await JournalClient(intake, AckDeadlines(5.0)).journal_shielded(EVENT)
        waited = trio.current_time() - started
    assert isinstance(ack, JournalUnavailable)
    assert waited == 5.0
    assert handed == [EVENT]  # it was handed over, just not answered in time


async def test_journal_answers_through_the_submission() -> None:
    """`journal` hands the event over and returns what the consumer answered."""
    intake, inbox = trio.open_memory_channel[Submission](1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                submission = await inbox.receive()
                submission.reply.answer(11)

            nursery.start_soon(consume)
            assert await JournalClient(intake, AckDeadlines(5.0)).journal(EVENT) == 11


async def test_full_intake_pushes_back_and_closed_intake_is_unavailable(
        autojump_clock: trio.abc.Clock) -> None:
    """A full intake makes the producer wait for room; a closed one answers at once."""
    intake, inbox = trio.open_memory_channel[Submission](0)
    journal = JournalClient(intake, AckDeadlines(5.0))
    with trio.move_on_after(1) as scope:
        await journal.journal(EVENT)  # nobody receives: blocked in send, not in the reply
    assert scope.cancelled_caught
    inbox.close()
    with trio.fail_after(1):
        assert isinstance(await journal.journal(EVENT), JournalUnavailable)


async def _journal_through(deadlines: AckDeadlines, intake: JournalIntake) -> tuple[Ack, float]:
    """Journal EVENT through a client on `deadlines` (its timer running): the answer and
    the wait."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deadlines.run)
            started = trio.current_time()
            ack = await JournalClient(intake, deadlines).journal(EVENT)
            nursery.cancel_scope.cancel()
    return ack, trio.current_time() - started


async def test_deadlines_answer_an_unanswered_wait_in_time(
        autojump_clock: trio.abc.Clock) -> None:
    """A webhook's wait through `AckDeadlines` ends with JournalUnavailable after its
    timeout (at most one check interval late), and the event was handed over."""
    deadlines = AckDeadlines(5.0)
    intake, inbox = trio.open_memory_channel[Submission](1)
    ack, waited = await _journal_through(deadlines, intake)
    assert isinstance(ack, JournalUnavailable)
    assert 5.0 <= waited <= 5.0 + CHECK_EVERY
    assert inbox.receive_nowait().event is EVENT


async def test_deadlines_keep_answers_and_stop_at_the_first_live_wait() -> None:
    """Expiry never overwrites an answer, lets answered entries go (due or not), and stops
    at the oldest wait that is neither answered nor due: entries behind it stay, even
    answered ones."""
    deadlines = AckDeadlines(5.0)
    answered, due, early, live, behind = Reply(), Reply(), Reply(), Reply(), Reply()
    for deadline, reply in [(1.0, answered), (2.0, due), (4.0, early), (9.0, live),
                            (10.0, behind)]:
        deadlines.watch(deadline, reply)
    answered.answer(1)
    early.answer(2)  # answered before its deadline: let go all the same
    behind.answer(3)
    deadlines.expire(now=3.0)
    assert len(deadlines) == 2  # the live wait, and the one behind it
    assert await answered.wait() == 1
    assert await early.wait() == 2
    assert isinstance(await due.wait(), JournalUnavailable)
    assert not live.answered


async def test_the_first_answer_stands() -> None:
    """A reply told 503 (deadline) is not turned into 200 by the journal's later answer."""
    reply = Reply()
    reply.answer(JournalUnavailable("journal not durable in time"))
    reply.answer(5)
    assert isinstance(await reply.wait(), JournalUnavailable)


async def test_deadlines_bound_a_wait_for_room_in_a_full_intake(
        autojump_clock: trio.abc.Clock) -> None:
    """A producer blocked on a full intake (a commit stuck on the disk) still hears 503
    after its timeout, not when the journal comes back."""
    deadlines = AckDeadlines(5.0)
    intake, inbox = trio.open_memory_channel[Submission](1)
    intake.send_nowait(Submission(EVENT, Reply()))  # the intake is full
    ack, waited = await _journal_through(deadlines, intake)
    assert isinstance(ack, JournalUnavailable)
    assert waited == 5.0
    assert len(deadlines) == 1 and inbox.statistics().current_buffer_used == 1
    deadlines.expire(trio.current_time())
    assert len(deadlines) == 0  # answered by the producer itself: nothing left to watch


async def test_journal_closing_under_a_blocked_producer_is_unavailable() -> None:
    """A journal that goes away while a producer waits for room answers JournalUnavailable,
    never an exception."""
    intake, inbox = trio.open_memory_channel[Submission](0)
    got: list[object] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def produce() -> None:
                got.append(await JournalClient(intake, AckDeadlines(60)).journal(EVENT))

            nursery.start_soon(produce)
            await trio.testing.wait_all_tasks_blocked()
            inbox.close()
    assert len(got) == 1 and isinstance(got[0], JournalUnavailable)
