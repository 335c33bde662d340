"""How the poller paces its fetches so that Twilio never has to refuse them for long.

Three rules (docs/twilio.md, "Rate limits when reading"):

- **A window of fetches in flight, AIMD.** It starts at `poller.concurrency`; every sign of
  overload (429, 5xx, a timeout) halves it, once per round trip (a fetch issued before the
  last cut does not cut again), and each full window of successes raises it by one, back up
  to the configured size. TCP's congestion control, for the same reason: many clients share
  one account's concurrency, and none knows the limit.
- **Backoff with full jitter** before a refused fetch is tried again, so that workers
  refused together do not come back together; after `MAX_TRIES` the message waits for the
  next pass.
- **A pause while the credentials are refused** (401, 403): every fetch would fail the same
  way, so all stop. The first worker to meet the refusal probes once a minute with the same
  fetch, logging one error each time, and the poller resumes as soon as a probe is answered.
  The pause is reported (`report`) for /healthz and the `msgledger_poller_paused` gauge.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from .logs import get_logger
from .metrics import PollerMetrics
from .twilio_api import CredentialsRefused, Fetched, FetchOutcome, Throttled

log = get_logger("msgledger.poller")

Fetch = Callable[[str], Awaitable[FetchOutcome]]  # one fetch by SID (`TwilioApi.fetch_message`)
Report = Callable[[str], None]  # the poller's state for /healthz: "running" or "paused: ..."

MAX_TRIES = 8  # throttled fetches of one message per pass; then it waits for the next pass
BACKOFF_FIRST = 1.0  # seconds: the first retry waits up to this (full jitter), doubling
BACKOFF_MOST = 60.0  # seconds: no retry waits longer
PROBE_EVERY = 60.0  # seconds between probes while the credentials are refused (one error each)
RUNNING = "running"


class Window:
    """How many fetches may be in flight now: cut in half by overload, raised by one after
    a window's worth of successes, never below one nor above `most`."""

    def __init__(self, most: int, metrics: PollerMetrics) -> None:
        self._most = most
        self._limiter = trio.CapacityLimiter(most)
        self._metrics = metrics
        self._successes = 0
        self._cut_at = -math.inf  # Trio time of the last cut
        metrics.concurrency.set(most)

    @property
    def size(self) -> int:
        return int(self._limiter.total_tokens)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one place in the window; yields the Trio time the fetch was issued."""
        async with self._limiter:
            yield trio.current_time()

    def overloaded(self, issued_at: float) -> None:
        if issued_at < self._cut_at:
            return  # issued under the old window: that overload is already answered
        self._resize(max(1, self.size // 2))
        self._cut_at = trio.current_time()

    def succeeded(self) -> None:
        self._successes += 1
        if self._successes >= self.size and self.size < self._most:
            self._resize(self.size + 1)

    def _resize(self, size: int) -> None:
        # Borrowers keep what they hold; a smaller window only delays new fetches.
        self._limiter.total_tokens = size
        self._successes = 0
        self._metrics.concurrency.set(size)


class Pacer:
    """The poller's one way to fetch: paced by the window, backed off, paused while the
    credentials are refused."""

    def __init__(self, fetch: Fetch, *, concurrency: int, metrics: PollerMetrics,
                 report: Report, rng: random.Random) -> None:
        self._fetch = fetch
        self._window = Window(concurrency, metrics)
        self._metrics = metrics
        self._report = report
        self._rng = rng
        self._paused: str | None = None  # why, while the credentials are refused
        self._resumed = trio.Event()
        report(RUNNING)

    async def fetch(self, sid: str) -> Fetched | None:
        """Twilio's answer about `sid`; None if it stayed throttled for MAX_TRIES tries."""
        tries = 0
        while tries < MAX_TRIES:
            if self._paused is not None:
                await self._resumed.wait()
            outcome = await self._once(sid)
            if isinstance(outcome, Fetched):
                return outcome
            if isinstance(outcome, Throttled):
                tries += 1
                await trio.sleep(self._backoff(tries))
            else:
                await self._stand_by(sid, outcome)
        return None

    async def _once(self, sid: str) -> FetchOutcome:
        async with self._window.slot() as issued_at:
            started = time.perf_counter()
            outcome = await self._fetch(sid)
            self._metrics.fetch_seconds.observe(time.perf_counter() - started)
        if isinstance(outcome, Throttled):
            self._metrics.polls.labels("throttled").inc()
            self._window.overloaded(issued_at)
        elif isinstance(outcome, CredentialsRefused):
            self._metrics.polls.labels("refused").inc()
        else:
            self._window.succeeded()
        return outcome

    def _backoff(self, tries: int) -> float:
        return self._rng.uniform(0, min(BACKOFF_MOST, BACKOFF_FIRST * 2 ** (tries - 1)))

    async def _stand_by(self, sid: str, refused: CredentialsRefused) -> None:
        """Pause, and probe with `sid` until Twilio answers otherwise; or, if another worker
        already probes, wait for it to resume."""
        if self._paused is not None:
            await self._resumed.wait()
            return
        self._pause(refused)
        paused_at = trio.current_time()
        while True:
            log.error("poller_paused", reason=self._paused, http_status=refused.http_status,
                      error_code=refused.error_code, retry_in=PROBE_EVERY)
            await trio.sleep(PROBE_EVERY)
            probe = await self._once(sid)  # its answer is fetched again once resumed
            if not isinstance(probe, CredentialsRefused):
                break
            refused = probe
        self._resume(trio.current_time() - paused_at)

    def _pause(self, refused: CredentialsRefused) -> None:
        self._paused = (f"paused: Twilio refuses the credentials (HTTP {refused.http_status}"
                        f", code {refused.error_code}: {refused.message})")
        self._resumed = trio.Event()
        self._metrics.paused.set(1)
        self._report(self._paused)

    def _resume(self, paused_for: float) -> None:
        log.info("poller_resumed", paused_seconds=round(paused_for, 3))
        self._paused = None
        self._resumed.set()
        self._metrics.paused.set(0)
        self._report(RUNNING)
