"""The reconciler on virtual time, on the poll rig's journal, store and simulator
(`tests/poll_rig.py`: blocking calls run in place, the simulator answers in-process, the
wall clock is `EPOCH` plus the Trio clock).

The list is the simulator's own list endpoint (`sim._app.handle_api`), its answer read by
`twilio_api.page_of` as `TwilioApi.list_page` reads one; the HTTP path is tested end to end
over real sockets elsewhere.
"""

from __future__ import annotations

import base64
import datetime as dt
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlencode

import trio

from msgledger.events import Event
from msgledger.reconcile.run import Run, RunDeps
from msgledger.reconciler import Reconciler, ReconcilerConfig
from msgledger.sim import Simulator
from msgledger.sim._app import handle_api
from msgledger.sim._http import Request
from msgledger.store_reads import StoreReads
from msgledger.twilio_api import PageOutcome, TwilioApi, TwilioConfig, page_of
from msgledger.twilio_exports import BulkExport

from .conftest import ACCOUNT_SID, AUTH_TOKEN
from .poll_rig import EPOCH, Rig, inline, iso, sim_fetch, virtual_now

DAY = dt.date(2026, 10, 20)  # a closed day, well before the rig's EPOCH (2026-11-01)
NOON = dt.datetime.combine(DAY, dt.time(12), dt.UTC)
CONFIG = ReconcilerConfig(daily_at=dt.time(3, 30, tzinfo=dt.UTC), lookback_days=2,
                          source="list", export_over=100_000, export_poll_interval=60.0,
                          match_window=600.0)
ListPage = Callable[[str | None, dict[str, str]], Awaitable[PageOutcome]]
assert EPOCH.date() > DAY


def sim_list_page(sim: Simulator) -> ListPage:
    """`TwilioApi.list_page`, answered by the simulator in-process."""
    basic = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()

    async def list_page(next_page_uri: str | None, params: dict[str, str]) -> PageOutcome:
        target = next_page_uri or (f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?"
                                   + urlencode(params))
        answer = await handle_api(sim, Request("GET", target,
                                               {"authorization": f"Basic {basic}"}, b""))
        return page_of(answer.status, answer.body.decode())

    return list_page


def reconciler_for(rig: Rig, *, config: ReconcilerConfig = CONFIG,
                   list_page: ListPage | None = None, keep_body: str = "full") -> Reconciler:
    deps = RunDeps(journal=rig.client.clone(), reads=StoreReads(str(rig.path), run_sync=inline),
                   list_page=list_page or sim_list_page(rig.sim), fetch=sim_fetch(rig.sim),
                   clock=virtual_now, keep_body=keep_body, match_window=config.match_window,
                   rng=random.Random(3))
    # No export here: it is tested over real sockets (tests/test_reconcile_export.py).
    nowhere = TwilioApi(TwilioConfig(ACCOUNT_SID, AUTH_TOKEN, base_url="http://sim.invalid"))
    return Reconciler(config, deps, BulkExport(nowhere))


@asynccontextmanager
async def running(rig: Rig, **options: Any) -> AsyncIterator[Reconciler]:
    """A reconciler on `rig` (see `reconciler_for`), serving until the block ends."""
    reconciler, stop = reconciler_for(rig, **options), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(reconciler.serve, stop))
        yield reconciler
        stop.set()


async def finished(run: Run, *, within: float = 3600.0) -> Run:
    """`run` once it has ended and its report is journaled (virtual seconds at most)."""
    with trio.fail_after(within):
        await run.recorded.wait()
    return run


async def reconcile(reconciler: Reconciler, day: dt.date = DAY, source: Any = "list") -> Run:
    return await finished(await reconciler.request(day, source))


def at(moment: dt.datetime) -> str:
    return iso(moment)


def registered(sid: str, when: dt.datetime, status: str = "sent",
               to: str = "+15558675310") -> Event:
    """A message an app registered: its SID and status, at `when`."""
    return Event("register", "register", at(when), sid=sid, status=status,
                 data={"to": to, "from": "+15005550001"})


def lost_send(ref: str, when: dt.datetime, *, to: str = "+15558675310",
              body_sha256: str | None = None) -> list[Event]:
    """A send whose create answer never came: requested, then outcome unknown."""
    data: dict[str, Any] = {"to": to, "from": "+15005550001", "messaging_service_sid": None}
    if body_sha256 is not None:
        data["body_sha256"] = body_sha256
    return [Event("send_requested", "api", at(when), ref=ref, status="requested", data=data),
            Event("send_unknown", "api", at(when + dt.timedelta(seconds=15)), ref=ref,
                  status="outcome_unknown", data={"reason": "connection lost", "attempts": 1})]
