"""The reconciler's export source end to end: the real daemon asks the simulator's Bulk
Export over HTTP through the real `twilio` client, waits for its job, downloads the day
file and compares it (docs/design.md, "The daily reconciler")."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from msgledger import store
from msgledger.events import Event
from msgledger.sim import SimKnobs, Simulator, serve_sim

from .conftest import ACCOUNT_SID, API_TOKEN, AUTH_TOKEN, Ledger, daemon_environ, open_ledger

DAY = dt.date.today() - dt.timedelta(days=5)  # old enough for Bulk Export (two days)
NOON = dt.datetime.combine(DAY, dt.time(12), dt.UTC)
TO = "+15558675310"
ENDED = ("done", "incomplete", "failed")
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}


def env_for(sim: Simulator) -> dict[str, str]:
    return {"MSGLEDGER_TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "MSGLEDGER_TWILIO_API_BASE_URL": sim.base_url,
            "MSGLEDGER_TWILIO_BULKEXPORTS_BASE_URL": sim.base_url,
            "MSGLEDGER_RECONCILER_EXPORT_POLL_INTERVAL": "50ms"}


@asynccontextmanager
async def simulator(**knobs: Any) -> AsyncIterator[Simulator]:
    sim_knobs = SimKnobs(ACCOUNT_SID, AUTH_TOKEN, seed=3, **knobs)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(partial(serve_sim, sim_knobs))
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def daemon(tmp_path: Path, sim: Simulator) -> AsyncIterator[Ledger]:
    async with open_ledger(daemon_environ(tmp_path / "out.db", **env_for(sim))) as ledger:
        yield ledger


async def ask(ledger: Ledger, source: str = "export") -> str:
    answer = await ledger.client.post("/v1/reconcile", headers=BEARER,
                                      json={"date": DAY.isoformat(), "source": source})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["run_id"])


async def report(ledger: Ledger, run_id: str) -> dict[str, Any]:
    answer = await ledger.client.get(f"/v1/reconcile/runs/{run_id}", headers=BEARER)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def until(ledger: Ledger, run_id: str, *statuses: str) -> dict[str, Any]:
    """The run's report once its status is one of `statuses` (polled over HTTP)."""
    with trio.fail_after(30):
        while True:
            found = await report(ledger, run_id)
            if found["status"] in statuses:
                return found
            await trio.sleep(0.05)


async def register(ledger: Ledger, sid: str, status: str) -> None:
    answer = await ledger.client.post("/v1/messages/register", headers=BEARER, json={
        "sid": sid, "to": TO, "from": "+15005550001", "status": status})
    assert answer.status_code == 201, answer.text


async def test_a_day_is_exported_waited_for_and_compared(tmp_path: Path) -> None:
    async with simulator(export_job_delay=0.3, export_inbound_per_day=3) as sim:
        stale = sim.add_message(to=TO, status="delivered", date_created=NOON, date_sent=NOON)
        same = sim.add_message(to=TO, status="delivered", date_created=NOON, date_sent=NOON)
        outside = sim.add_message(to=TO, status="failed", date_created=NOON, date_sent=NOON)
        sim.add_export_line(DAY.isoformat(), b'{"sid": "SM')  # a line cut short
        async with daemon(tmp_path, sim) as ledger:
            await register(ledger, stale.sid, "sent")
            await register(ledger, same.sid, "delivered")
            run_id = await ask(ledger)
            waiting = await until(ledger, run_id, "waiting_for_export", *ENDED)
            assert waiting["status"] == "waiting_for_export" and waiting["job_sid"]
            done = await until(ledger, run_id, *ENDED)
            records = {r["sid"]: r for r in await _records(ledger)}
            again = await until(ledger, await ask(ledger), *ENDED)
    assert done["status"] == "done", done["reason"]
    assert done["source"] == "export" and done["lines"] == 3 + 3 + 1
    counts = done["counts"]
    # The day's three inbound messages never reached the webhook: imported, and said so.
    assert (counts["missed_webhook"], counts["broken"], counts["updated"]) == (3, 1, 1)
    assert (counts["unchanged"], counts["imported"]) == (1, 1 + 3)
    assert done["broken"][0]["raw"] == '{"sid": "SM'
    assert records[stale.sid]["status"] == "delivered"
    assert records[outside.sid]["flags"] == ["imported"]
    # The file existed by then: read at once, no second job, nothing new.
    assert again["status"] == "done" and again["job_sid"] is None
    assert sim.stats.export_jobs_created == 1
    assert again["counts"].get("updated", 0) == again["counts"].get("imported", 0) == 0


async def test_a_restart_while_waiting_for_the_job_resumes_the_wait(tmp_path: Path) -> None:
    async with simulator(export_job_delay=2.0) as sim:
        message = sim.add_message(to=TO, status="undelivered", date_created=NOON,
                                  date_sent=NOON, error_code=30003)
        async with daemon(tmp_path, sim) as ledger:
            run_id = await ask(ledger)
            waiting = await until(ledger, run_id, "waiting_for_export", *ENDED)
        assert waiting["status"] == "waiting_for_export"
        async with daemon(tmp_path, sim) as ledger:  # the same store, the job still pending
            done = await until(ledger, run_id, *ENDED)
            record = (await ledger.client.get(f"/v1/messages/{message.sid}",
                                              headers=BEARER)).json()
    assert done["status"] == "done" and done["job_sid"] == waiting["job_sid"]
    assert sim.stats.export_jobs_created == 1
    assert (record["status"], record["error_code"]) == ("undelivered", "30003")
    conn = store.connect(str(tmp_path / "out.db"), readonly=True)
    try:
        kinds = [e.kind for e in store._reconcile.run_events(conn)
                 if e.data.get("run_id") == run_id]
    finally:
        conn.close()
    assert kinds == ["reconcile_run", "reconcile_export_job", "reconcile_started"]


async def test_a_failed_download_is_begun_again_from_a_new_link(tmp_path: Path) -> None:
    async with simulator(export_job_delay=0.0) as sim:
        for i in range(2500):  # three batches, so the cut comes after some were compared
            sim.add_message(to=TO, status="delivered", date_created=NOON,
                            date_sent=NOON + dt.timedelta(seconds=i))
        async with daemon(tmp_path, sim) as ledger:
            first = await until(ledger, await ask(ledger), *ENDED)  # makes the file
            sim.fail_downloads(1)
            retried = await until(ledger, await ask(ledger), *ENDED)
            sim.fail_downloads(3)
            given_up = await until(ledger, await ask(ledger), *ENDED)
    assert first["status"] == "done" and first["counts"]["imported"] == 2500
    assert retried["status"] == "done" and retried["counts"]["downloads_failed"] == 1
    assert retried["lines"] == 2500 and retried["counts"]["unchanged"] == 2500
    assert given_up["status"] == "incomplete"
    assert "could not be downloaded after 3 tries" in given_up["reason"]


async def test_an_empty_day_has_no_file_and_is_done(tmp_path: Path) -> None:
    async with simulator(export_job_delay=0.0) as sim, daemon(tmp_path, sim) as ledger:
        done = await until(ledger, await ask(ledger), *ENDED)
    assert done["status"] == "done" and done["lines"] == 0 and done["job_sid"]


async def _records(ledger: Ledger) -> list[dict[str, Any]]:
    page = (await ledger.client.get("/v1/messages", headers=BEARER,
                                    params={"limit": 1000})).json()
    return list(page["messages"])


async def test_auto_takes_the_export_for_a_big_day_and_the_list_for_a_small_one(
        tmp_path: Path) -> None:
    """`reconciler.export_over` is the day's size, in the store, past which `auto` reads
    Bulk Export (for a day old enough); at or under it, the list."""
    path = tmp_path / "out.db"
    async with simulator(export_job_delay=0.0) as sim:
        message = sim.add_message(to=TO, status="delivered", date_created=NOON,
                                  date_sent=NOON)
        writer = store.JournalWriter.open(str(path))  # the day's one message, of that day
        writer.append([Event("register", "register", NOON.isoformat(timespec="microseconds"),
                             sid=message.sid, status="sent", data={"to": TO})])
        writer.close()
        runs = {}
        for over in ("0", "1"):
            env = {**env_for(sim), "MSGLEDGER_RECONCILER_EXPORT_OVER": over}
            async with open_ledger(daemon_environ(path, **env)) as ledger:
                runs[over] = await until(ledger, await ask(ledger, "auto"), *ENDED)
    assert (runs["0"]["status"], runs["0"]["source"], runs["0"]["asked"]) == (
        "done", "export", "auto")
    assert (runs["1"]["status"], runs["1"]["source"]) == ("done", "list")
    assert runs["0"]["lines"] == runs["0"]["counts"]["listed"] == 1
