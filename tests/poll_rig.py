"""The poller on virtual time: the real journal, store, poller and simulator, wired as
`main.py` wires them, minus the two things that would let Trio's autojump clock run away.

- Blocking store calls (the journal's commits, the poller's reads) run in place rather than
  in a worker thread (`store_reads.RunSync`): while a thread works the loop looks idle, and
  the autojump clock would leap to the next deadline mid-commit.
- Twilio is the simulator answering in-process (`sim._app.handle_api`, the same code its HTTP
  server runs), and its answer is read as `TwilioApi.fetch_message` reads one: the 200 body
  through the twilio library's own `MessageInstance`, an error by `twilio_api.fetch_error`.
  The HTTP path itself is tested over real sockets (tests/test_twilio_fetch.py, and the
  end-to-end poll test).

The wall clock the poller reads is virtual too: `EPOCH` plus the Trio clock.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import trio
from twilio.rest import Client
from twilio.rest.api.v2010.account.message import MessageInstance

from msgledger import store
from msgledger.deadlines import AckDeadlines
from msgledger.events import Ack, Event, Submission
from msgledger.journal import INTAKE_BUFFER, run_journal
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics
from msgledger.pacing import Fetch
from msgledger.poller import PollerConfig, PollerDeps, run_poller
from msgledger.sim import SimKnobs, Simulator, open_simulator
from msgledger.sim._app import handle_api
from msgledger.sim._http import Request
from msgledger.store_reads import StoreReads
from msgledger.twilio_api import Fetched, FetchOutcome, fetch_error, fetched

from .conftest import ACCOUNT_SID, AUTH_TOKEN

T = TypeVar("T")
EPOCH = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
HOUR = 3600.0
DAY = 24 * HOUR
ACK_TIMEOUT = 10 * 365 * DAY  # virtual: nothing here must ever time out
CONFIG = PollerConfig(overdue_after=12 * HOUR, give_up_after=7 * DAY, interval=300.0,
                      concurrency=4, backlog_every=3600.0)


async def inline(fn: Callable[[], T], *, limiter: trio.CapacityLimiter | None = None) -> T:
    """`RunSync` in place: the call blocks the loop, which is what virtual time needs."""
    await trio.lowlevel.checkpoint()
    return fn()


def virtual_at(trio_time: float) -> dt.datetime:
    """The wall-clock time the poller reads at Trio time `trio_time`."""
    return EPOCH + dt.timedelta(seconds=trio_time)


def virtual_now() -> dt.datetime:
    return virtual_at(trio.current_time())


def iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def sim_fetch(sim: Simulator, account: str = ACCOUNT_SID,
              token: str = AUTH_TOKEN) -> Callable[[str], Awaitable[FetchOutcome]]:
    """A fetch by SID answered by the simulator in-process, read as the client reads it."""
    ask = _asker(sim, account, token)
    return lambda sid: ask(f"Messages/{quote(sid, safe='')}.json")


def sim_probe(sim: Simulator, account: str = ACCOUNT_SID,
              token: str = AUTH_TOKEN) -> Callable[[], Awaitable[FetchOutcome]]:
    """`TwilioApi.check_credentials`, answered by the simulator in-process."""
    ask = _asker(sim, account, token)
    return lambda: ask(None)


def _asker(sim: Simulator, account: str,
           token: str) -> Callable[[str | None], Awaitable[FetchOutcome]]:
    version = Client(account, token).api.v2010
    basic = base64.b64encode(f"{account}:{token}".encode()).decode()

    async def ask(under_account: str | None) -> FetchOutcome:
        target = f"/2010-04-01/Accounts/{account}" + (f"/{under_account}" if under_account
                                                      else ".json")
        answer = await handle_api(sim, Request("GET", target,
                                               {"authorization": f"Basic {basic}"}, b""))
        payload = json.loads(answer.body)
        if answer.status != 200:
            return fetch_error(answer.status, payload.get("code"), str(payload.get("message")))
        if under_account is None:
            return Fetched(200, {"sid": payload["sid"], "status": payload["status"]})
        return fetched(MessageInstance(version, payload, account))

    return ask


@dataclass
class Rig:
    """A running poller and what it polls; `states` are its reports, oldest first."""

    path: Path
    sim: Simulator
    client: JournalClient
    metrics: Metrics
    fetch: Fetch | None = None  # Twilio's answers, if not the simulator's (see `open_rig`)
    states: list[str] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    async def journal(self, *events: Event) -> list[Ack]:
        return [await self.client.journal(event) for event in events]

    async def sent(self, status: str = "sent", **sim_fields: Any) -> str:
        """A message Twilio has at `status` and the record has as just accepted (queued),
        now: its callbacks are all lost. Its SID."""
        message = self.sim.add_message(to="+15558675310", status=status, **sim_fields)
        await self.journal(Event("send_accepted", "api", iso(virtual_now()), sid=message.sid,
                                 ref=f"ref-{message.sid}", status="queued",
                                 data={"sid": message.sid, "status": "queued"}))
        return message.sid

    def record(self, sid: str) -> store.Record:
        conn = store.connect(str(self.path), readonly=True)
        try:
            found = store.find_record(conn, sid)
        finally:
            conn.close()
        assert found is not None
        return found

    def polls_of(self, sid: str) -> list[dict[str, Any]]:
        return [h for h in self.record(sid)["history"] if h["kind"] == "polled"]


@asynccontextmanager
async def open_rig(path: Path, *, config: PollerConfig = CONFIG, start: bool = True,
                   sim: Simulator | None = None, fetch: Fetch | None = None,
                   **knobs: Any) -> AsyncIterator[Rig]:
    """The journal on `path`, a simulator (or `sim`), and the poller (unless `start` is
    false: `start_poller` then starts it), fetching from the simulator unless `fetch` is
    given (a Twilio that answers what the simulator never would). Everything ends with the
    block."""
    writer = store.JournalWriter.open(str(path))
    deadlines = AckDeadlines(ACK_TIMEOUT)
    intake, inbox = trio.open_memory_channel[Submission](INTAKE_BUFFER)
    metrics = Metrics()
    try:
        async with trio.open_nursery() as timers, _simulator(sim, knobs) as simulator:
            timers.start_soon(deadlines.run)
            async with trio.open_nursery() as services:
                await services.start(partial(run_journal, inbox, writer=writer, metrics=metrics,
                                             run_sync=inline))
                with JournalClient(intake, deadlines) as client:
                    rig = Rig(path, simulator, client.clone(), metrics, fetch=fetch)
                    with rig.client:
                        if start:
                            await start_poller(services, rig, config)
                        yield rig
                        rig.stop.set()
            timers.cancel_scope.cancel()
    finally:
        writer.close()


async def start_poller(nursery: trio.Nursery, rig: Rig, config: PollerConfig = CONFIG, *,
                       reads_from: Path | None = None) -> None:
    """The poller on `rig`; its store reads go to `reads_from` if given (an unreadable
    store, say)."""
    deps = PollerDeps(journal=rig.client.clone(), fetch=rig.fetch or sim_fetch(rig.sim),
                      probe=sim_probe(rig.sim),
                      reads=StoreReads(str(reads_from or rig.path), run_sync=inline),
                      metrics=rig.metrics.poller, report=rig.states.append, clock=virtual_now,
                      rng=random.Random(5))
    await nursery.start(partial(run_poller, rig.stop, config=config, deps=deps))


@asynccontextmanager
async def _simulator(given: Simulator | None, knobs: dict[str, Any]) -> AsyncIterator[Simulator]:
    if given is not None:
        yield given
        return
    sim_knobs = SimKnobs(ACCOUNT_SID, AUTH_TOKEN, **knobs)
    async with open_simulator(sim_knobs, base_url="http://sim.invalid",
                              deliver=_nowhere) as sim:
        yield sim


async def _nowhere(callback: Any) -> Any:
    raise AssertionError("the rig's messages have no StatusCallback")


async def until(condition: Callable[[], bool], *, step: float = 60.0,
                most: float = 30 * DAY) -> float:
    """Wait (in virtual time) until `condition()` holds; the Trio time it first did."""
    with trio.fail_after(most):
        while not condition():  # noqa: ASYNC110 (the condition is in the store)
            await trio.sleep(step)
    return trio.current_time()


def age_of(entry: dict[str, Any], since: float = 0.0) -> float:
    """Seconds from virtual time `since` to the journal time of history `entry`."""
    at = dt.datetime.fromisoformat(entry["at"])
    return (at - (EPOCH + dt.timedelta(seconds=since))).total_seconds()
