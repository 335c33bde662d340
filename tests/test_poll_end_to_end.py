"""The poller end to end: the real daemon sends through the real `twilio` client to the
simulator over HTTP, the simulator loses callbacks, and the poller fetches what they would
have said (docs/design.md, "The overdue poller")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio

from msgledger import store
from msgledger.sim import OutcomeWeights

from .conftest import Ledger
from .test_outbound import all_records, send, sim_and_ledger

SENDS = 300
MIXED = OutcomeWeights(delivered=0.8, undelivered=0.1, failed=0.1)
# Overdue after 4 s: later than every send and callback here (about 3 s on a loaded
# machine), so what the callbacks alone left wrong is seen before the poller mends it.
FAST_POLLER = {"MSGLEDGER_POLLER_OVERDUE_AFTER": "4s", "MSGLEDGER_POLLER_INTERVAL": "250ms",
               "MSGLEDGER_POLLER_GIVE_UP_AFTER": "1h"}


async def test_lost_callbacks_end_in_the_true_final_state(tmp_path: Path) -> None:
    """300 sends with 15 % of callbacks lost: some records are left wrong by the callbacks
    alone, and the poller brings every record with a SID to its message's final status at
    Twilio, through `polled` events (source `poll`); verify's replay agrees."""
    async with sim_and_ledger(tmp_path, env=FAST_POLLER, callback_loss=0.15,
                              outcome_weights=MIXED) as (sim, ledger):
        async with trio.open_nursery() as nursery:
            for first in range(25):
                nursery.start_soon(_send_every, ledger, first)
        await sim.wait_idle()
        truth = {sid: m.status for sid, m in sim.messages.items()}
        left_wrong = sum(r["status"] != truth[r["sid"]] for r in await all_records(ledger))
        with trio.fail_after(60):
            while records := await all_records(ledger):
                if all(r["status"] == truth[r["sid"]] for r in records):
                    break
                await trio.sleep(0.2)
        path = str(tmp_path / "out.db")
    assert sim.stats.callbacks_lost > 0 and left_wrong > 0
    assert len(records) == SENDS == len(truth)
    assert all(r["final"] for r in records)
    polled = [r for r in records if any(h["kind"] == "polled" for h in r["history"])]
    assert len(polled) >= left_wrong
    assert all(h["source"] == "poll" for r in polled for h in r["history"]
               if h["kind"] == "polled")
    assert store.verify(path).ok


async def _send_every(ledger: Ledger, first: int) -> None:
    for n in range(first, SENDS, 25):
        response = await send(ledger, to=f"+1555000{n:04d}")
        assert response.status_code == 201


async def test_a_front_reports_the_pause_when_twilio_refuses_the_credentials(
        tmp_path: Path) -> None:
    """With two fronts, the poller's pause (Twilio answers 401 to its fetches over real
    HTTP) reaches the /healthz a front answers, with the HTTP status still 200, and the
    `msgledger_poller_paused` gauge."""
    env = {**FAST_POLLER, "MSGLEDGER_HTTP_WORKERS": "2"}
    async with sim_and_ledger(tmp_path, env=env, callback_loss=1.0) as (sim, ledger):
        assert (await ledger.client.get("/healthz")).json()["poller"] == "running"
        assert (await send(ledger)).status_code == 201
        sim.knobs = dataclasses.replace(sim.knobs, auth_token="rotated-" + "0" * 24)
        with trio.fail_after(30):
            health = await ledger.client.get("/healthz")
            while not health.json()["poller"].startswith("paused"):
                await trio.sleep(0.1)
                health = await ledger.client.get("/healthz")
        metrics = (await ledger.client.get("/metrics")).text
    assert health.status_code == 200 and health.json()["worker"] >= 1
    assert health.json()["poller"].startswith("paused: Twilio refuses the credentials (HTTP 401")
    assert "msgledger_poller_paused 1.0" in metrics
