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
  way, so all stop. The first worker to meet the refusal probes once a minute by fetching
  the account itself (`probe`: a refusal about one message must not stop them all),
  logging one error each time, and the poller resumes as soon as a probe is answered. A
  message refused again once the probe passed was refused for itself: that refusal is its
  answer. The pause is reported (`report`) for /healthz and the `msgledger_poller_paused`
  gauge.
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
Probe = Callable[[], Awaitable[FetchOutcome]]  # the credentials alone (`check_credentials`)
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

    def __init__(self, fetch: Fetch, probe: Probe, *, concurrency: int,
                 metrics: PollerMetrics, report: Report, rng: random.Random) -> None:
        self._fetch = fetch
        self._probe = probe
        self._window = Window(concurrency, metrics)
        self._metrics = metrics
        self._report = report
        self._rng = rng
        self._paused: str | None = None  # why, while the credentials are refused
        self._resumed = trio.Event()
        self._resumed_at = -math.inf  # Trio time of the last resume
        report(RUNNING)

    async def fetch(self, sid: str) -> Fetched | Throttled:
        """Twilio's answer about `sid`, or the last refusal if it stayed throttled for
        MAX_TRIES tries (the message waits for the next pass)."""
        tries, probed, last = 0, False, Throttled("not tried")
        while tries < MAX_TRIES:
            if self._paused is not None:
                await self._resumed.wait()
            outcome, issued_at = await self._once(self._fetch, sid)
            if isinstance(outcome, Fetched):
                return outcome
            if isinstance(outcome, Throttled):
                tries, last = tries + 1, outcome
                await trio.sleep(self._backoff(tries))
            elif probed:  # the credentials passed the probe: this message is refused itself
                return Fetched(outcome.http_status, {}, outcome.error_code, outcome.message)
            elif issued_at >= self._resumed_at:  # else issued before the last resume: retry
                probed = await self._stand_by()
        return last

    async def twilio_answers(self) -> bool:
        """Whether Twilio answers the credentials probe now (not throttled, not refused):
        if so, a message throttled pass after pass is refused for itself."""
        probe, _ = await self._once(self._probe)
        return isinstance(probe, Fetched)

    async def _once(self, fetch: Callable[..., Awaitable[FetchOutcome]],
                    *args: str) -> tuple[FetchOutcome, float]:
        async with self._window.slot() as issued_at:
            started = time.perf_counter()
            outcome = await fetch(*args)
            self._metrics.fetch_seconds.observe(time.perf_counter() - started)
        if isinstance(outcome, Throttled):
            self._metrics.polls.labels("throttled").inc()
            self._window.overloaded(issued_at)
        elif isinstance(outcome, CredentialsRefused):
            self._metrics.polls.labels("refused").inc()
        else:
            self._window.succeeded()
        return outcome, issued_at

    def _backoff(self, tries: int) -> float:
        return self._rng.uniform(0, min(BACKOFF_MOST, BACKOFF_FIRST * 2 ** (tries - 1)))

    async def _stand_by(self) -> bool:
        """After a refusal: probe the credentials at once. Taken: the refusal was about the
        message (True). Refused: pause, and probe once a minute until Twilio takes them. If
        another worker already probes, wait for its resume instead (False)."""
        if self._paused is not None:
            await self._resumed.wait()
            return False
        probe, _ = await self._once(self._probe)
        if not isinstance(probe, CredentialsRefused):
            return True
        if self._paused is not None:  # another worker's probe paused first: it probes on
            await self._resumed.wait()
            return False
        self._pause(probe)
        paused_at = trio.current_time()
        while isinstance(probe, CredentialsRefused):
            log.error("poller_paused", reason=self._paused, http_status=probe.http_status,
                      error_code=probe.error_code, retry_in=PROBE_EVERY)
            await trio.sleep(PROBE_EVERY)
            probe, _ = await self._once(self._probe)
        self._resume(trio.current_time() - paused_at)
        return True

    def _pause(self, refused: CredentialsRefused) -> None:  # refused: the probe's answer
        self._paused = (f"paused: Twilio refuses the credentials (HTTP {refused.http_status}"
                        f", code {refused.error_code}: {refused.message})")
        self._resumed = trio.Event()
        self._metrics.paused.set(1)
        self._report(self._paused)

    def _resume(self, paused_for: float) -> None:
        log.info("poller_resumed", paused_seconds=round(paused_for, 3))
        self._paused = None
        self._resumed_at = trio.current_time()
        self._resumed.set()
        self._metrics.paused.set(0)
        self._report(RUNNING)
