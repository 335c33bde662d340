"""The deadline queue: one timer for every producer waiting on the journal, instead of a
cancel scope each.

On the webhook route a cancel scope per wait (its cancel status, and a deadline pushed and
popped on the run loop's heap) was most of what a handoff cost (bench/README.md,
"handoff"). Every wait is bounded by the same `http.ack_timeout`, so their deadlines come
due in the order they were set: a queue in arrival order and one task that wakes a few
times a second bound all of them. A reply still unanswered at its deadline is answered
`JournalUnavailable` (a 503); the journal's later answer is kept by the store all the
same, as with a cancel scope. `JournalClient` (`journal_client.py`) is its only user.
"""

from __future__ import annotations

from collections import deque

import trio

from .events import JournalUnavailable, Reply

CHECK_EVERY = 0.1  # seconds: a 503 comes at most this late; answered entries go this often


class AckDeadlines:
    """Bounds producers' waits for the journal to `seconds` each.

    `run` must be running while anyone waits: the process's wiring starts it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._tick = min(CHECK_EVERY, seconds / 4)  # a short timeout is checked more often
        self._waiting: deque[tuple[float, Reply]] = deque()
        self._watched = trio.Event()  # set when the queue gets an entry

    def watch(self, deadline: float, reply: Reply) -> None:
        """Answer `reply` JournalUnavailable if it is still unanswered at `deadline`, the
        Trio time `seconds` from now (so the queue stays in deadline order)."""
        if not self._waiting:  # only an empty queue's `run` waits: one check per callback
            self._watched.set()
        self._waiting.append((deadline, reply))

    async def run(self) -> None:
        """Answer expired replies every tick (`CHECK_EVERY`, or a quarter of a shorter
        timeout) while any are queued, until cancelled. An empty queue waits without
        ticking: an idle daemon (or a test on virtual time) is not woken ten times a
        second for nothing."""
        while True:
            if not self._waiting:
                self._watched = trio.Event()
                await self._watched.wait()
            await trio.sleep(self._tick)
            self.expire(trio.current_time())

    def expire(self, now: float) -> None:
        """Answer every reply past its deadline; let go of the answered ones in front."""
        waiting = self._waiting
        while waiting:
            deadline, reply = waiting[0]
            if not reply.answered and deadline > now:
                return
            waiting.popleft()
            if not reply.answered:
                reply.answer(JournalUnavailable("journal not durable in time"))

    def __len__(self) -> int:
        return len(self._waiting)
