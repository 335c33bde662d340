"""Handoff benchmark: the event loop's CPU per event to hand it to a journal and await the
answer, the way msgledger's webhook does it against the ways it was done before.

    .venv/bin/python bench/handoff.py            # 64 producers, 50,000 events a variant

A producer per simulated connection hands an event to a consumer that, like the journal
actor, takes everything waiting, yields once (its commit), and answers each event. No
SQLite and no HTTP: what is left is the cost of the handoff itself, measured as the
process's CPU time per event. The variants, in the order msgledger went through them:

- `channel+scope`: a one-slot memory channel pair per event, awaited inside
  `trio.move_on_after` (the textbook Trio shape);
- `reply+scope`:   `events.Reply`, a bare future, inside `trio.move_on_after`
  (`JournalClient.journal_shielded`, the sender's way);
- `reply+deadlines`: `events.Reply` bounded by `deadlines.AckDeadlines`, one timer for all
  (`JournalClient.journal`, the webhook route's).

Rounds alternate the variants and the medians are printed with the ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from msgledger.deadlines import AckDeadlines
from msgledger.events import Ack, Event, JournalInbox, JournalIntake, Submission
from msgledger.journal_client import JournalClient

EVENT = Event("callback", "callback", "2026-11-26T00:00:00.000000+00:00", sid="SM1",
              status="delivered")
ACK_TIMEOUT = 5.0  # seconds, http.ack_timeout's default
Handoff = Callable[[JournalIntake, JournalClient], Awaitable[Ack]]


async def consume(inbox: JournalInbox) -> None:
    """The journal's shape without SQLite: take all waiting, yield once, answer each."""
    async for first in inbox:
        batch = [first]
        while True:
            try:
                batch.append(inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        await trio.lowlevel.checkpoint()
        for seq, submission in enumerate(batch):
            submission.reply.answer(seq + 1)


async def channel_and_scope(intake: JournalIntake, _: JournalClient) -> Ack:
    """The handoff as first written: a memory channel pair per event."""
    reply_send, reply_receive = trio.open_memory_channel[Ack](1)
    answer: Ack = 0
    with trio.move_on_after(ACK_TIMEOUT):
        await intake.send(_ChannelSubmission(EVENT, reply_send))  # type: ignore[arg-type]
        with reply_receive:
            answer = await reply_receive.receive()
    return answer


class _ChannelSubmission:
    """A submission whose reply is a memory channel, answered through `.reply.answer`."""

    def __init__(self, event: Event, send: trio.MemorySendChannel[Ack]) -> None:
        self.event = event
        self.reply = self
        self._send = send

    def answer(self, ack: Ack) -> None:
        with self._send:
            self._send.send_nowait(ack)


async def run_variant(handoff: Handoff, producers: int, events: int,
                      deadlines: AckDeadlines) -> float:
    """CPU microseconds per event for `events` handoffs by `producers` concurrent tasks."""
    intake, inbox = trio.open_memory_channel[Submission](1024)
    per_producer = events // producers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, inbox)
        nursery.start_soon(deadlines.run)
        started = time.process_time()
        async with trio.open_nursery() as load:
            for _ in range(producers):
                load.start_soon(_produce, handoff, intake, JournalClient(intake, deadlines),
                                per_producer)
        spent = time.process_time() - started
        intake.close()
        nursery.cancel_scope.cancel()
    return spent / (per_producer * producers) * 1e6


async def _produce(handoff: Handoff, intake: JournalIntake, client: JournalClient,
                   count: int) -> None:
    for _ in range(count):
        await handoff(intake, client)


async def main(producers: int, events: int, rounds: int) -> None:
    deadlines = AckDeadlines(ACK_TIMEOUT)
    variants: dict[str, Handoff] = {
        "channel+scope": channel_and_scope,
        "reply+scope": lambda _, client: client.journal_shielded(EVENT),
        "reply+deadlines": lambda _, client: client.journal(EVENT),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, handoff in variants.items():
            results[name].append(await run_variant(handoff, producers, events, deadlines))
    print(f"{producers} producers, {events} events a variant, medians of {rounds} rounds")
    first = statistics.median(next(iter(results.values())))
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:16s} {median:6.1f} µs CPU/event  ({median / first:.2f} x)"
              f"  rounds: {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--producers", type=int, default=64)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trio.run(main, args.producers, args.events, args.rounds)
