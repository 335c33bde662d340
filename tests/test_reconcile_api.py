"""`POST /v1/reconcile`, `GET /v1/reconcile/runs[/{run_id}]` and `msgledger reconcile` on
a real daemon (in-process, 127.0.0.1, a real SQLite file) reconciling with the simulator
through the real twilio client; and `msgledger status`'s last reconcile from the same store.

The CLI runs as a child process (`python -m msgledger`), as an operator runs it: its blocking
HTTP client must not run inside the event loop that serves the daemon it asks."""

from __future__ import annotations

import datetime as dt
import json
import math
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from msgledger.http import openapi
from msgledger.sim import OutcomeWeights, SimKnobs, Simulator, serve_sim

from .conftest import (
    ACCOUNT_SID,
    API_TOKEN,
    AUTH_TOKEN,
    Ledger,
    child_env,
    daemon_environ,
    open_ledger,
    wait_until,
)

BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
ENDED = {"done", "incomplete", "failed"}
UNKNOWN_RUN = "RN" + "0" * 32
# A report's keys, as the OpenAPI document gives them (tests/test_openapi.py holds the rest).
REPORT_KEYS = set(json.loads(openapi.document())["components"]["schemas"]["RunReport"]["required"])


def day(days_from_today: int = 0) -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days_from_today)).isoformat()


@asynccontextmanager
async def open_sim(auth_token: str = AUTH_TOKEN) -> AsyncIterator[Simulator]:
    """The simulator playing Twilio, every message delivered within milliseconds."""
    knobs = SimKnobs(ACCOUNT_SID, auth_token, step_delay=(0.001, 0.005), seed=7,
                     outcome_weights=OutcomeWeights(delivered=1, undelivered=0, failed=0))
    async with trio.open_nursery() as nursery:
        yield await nursery.start(partial(serve_sim, knobs))
        nursery.cancel_scope.cancel()


def environ(store: Path, sim: Simulator | None, **extra: str) -> dict[str, str]:
    """A daemon's settings: with Twilio credentials (the simulator's) when `sim` is given,
    so that it has a reconciler; without, so that it has none."""
    twilio = {"MSGLEDGER_TWILIO_ACCOUNT_SID": ACCOUNT_SID,
              "MSGLEDGER_TWILIO_API_BASE_URL": sim.base_url} if sim is not None else {}
    return daemon_environ(store, **twilio, **extra)


@asynccontextmanager
async def reconciling(tmp_path: Path, **extra: str) -> AsyncIterator[tuple[Simulator, Ledger]]:
    async with open_sim() as sim, open_ledger(environ(tmp_path / "r.db", sim, **extra)) as ledger:
        yield sim, ledger


async def ask(ledger: Ledger, **fields: object) -> httpx.Response:
    return await ledger.client.post("/v1/reconcile", json=fields, headers=BEARER)


async def get(ledger: Ledger, path: str, **params: str) -> httpx.Response:
    return await ledger.client.get(path, params=params, headers=BEARER)


async def run_ended(ledger: Ledger, run_id: str) -> dict[str, Any]:
    """The run's report once it has ended (callers bound the wait)."""
    while True:
        answer = await get(ledger, f"/v1/reconcile/runs/{run_id}")
        assert answer.status_code == 200, answer.text
        if answer.json()["status"] in ENDED:
            return dict(answer.json())
        await trio.sleep(0.05)


async def runs(ledger: Ledger, **params: str) -> list[dict[str, Any]]:
    answer = await get(ledger, "/v1/reconcile/runs", **params)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["runs"])


async def send(ledger: Ledger, to: str) -> None:
    body = {"to": to, "from": "+15005550006", "body": "hello"}
    assert (await ledger.client.post("/v1/messages", json=body, headers=BEARER)).status_code == 201


# ------------------------------------------------------------------ the routes


async def test_a_run_of_today_by_list_is_accepted_and_ends_done(tmp_path: Path,
                                                                workers: str) -> None:
    """A run of today asked by list is answered 202 with its id, reads the simulator's list
    of the day so far and ends `done`; its report is at its id and first in the list (one
    process and two fronts)."""
    with trio.fail_after(60):
        async with reconciling(tmp_path, MSGLEDGER_HTTP_WORKERS=workers) as (sim, ledger):
            for n in range(3):
                await send(ledger, f"+1555000000{n}")
            outside = sim.add_message(to="+15550009999")  # sent without msgledger
            await sim.wait_idle()
            answer = await ask(ledger, date=day(), source="list")
            report = await run_ended(ledger, answer.json()["run_id"])
            listed = await runs(ledger)
            imported = (await get(ledger, f"/v1/messages/{outside.sid}")).json()
    assert answer.status_code == 202
    assert answer.json().keys() == {"run_id", "status"}
    assert report.keys() == REPORT_KEYS
    assert (report["run_id"], report["status"], report["complete"]) == (
        answer.json()["run_id"], "done", True)
    assert (report["date"], report["source"], report["asked"], report["trigger"]) == (
        day(), "list", "list", "api")
    assert report["pages"] >= 1 and report["counts"]["listed"] == 4
    assert listed == [report]
    assert "imported" in imported["flags"]


async def test_the_same_day_asked_again_while_it_runs_is_that_run(tmp_path: Path) -> None:
    """While a run is under way (Twilio answering 429 for now), asking for the same day and
    source again answers 202 with that run, not a second one; another source is another
    run, queued behind it. Both end done once Twilio answers again."""
    with trio.fail_after(60):
        async with reconciling(tmp_path) as (sim, ledger):
            sim.throttle(until=math.inf)
            first = (await ask(ledger, date=day(), source="list")).json()
            again = await ask(ledger, date=day(), source="list")
            other = (await ask(ledger, date=day(), source="auto")).json()
            sim.throttle(requests=0)
            ended = [await run_ended(ledger, r["run_id"]) for r in (first, other)]
    assert again.status_code == 202 and again.json() == first
    assert first["status"] == "running"
    assert other["run_id"] != first["run_id"]
    assert [r["status"] for r in ended] == ["done", "done"]


async def test_runs_outlive_the_daemon_and_are_listed_from_the_journal(tmp_path: Path) -> None:
    """Ended runs are read from the journal by a daemon started later on the same store,
    newest first and each once, with or without a reconciler; without one, asking for a run
    is 503 naming the settings it lacks."""
    store = tmp_path / "kept.db"
    with trio.fail_after(60):
        async with open_sim() as sim:
            async with open_ledger(environ(store, sim)) as first_daemon:
                answer = await ask(first_daemon, date=day(), source="list")
                older = await run_ended(first_daemon, answer.json()["run_id"])
            async with open_ledger(environ(store, sim)) as second_daemon:
                after_restart = await runs(second_daemon)
                answer = await ask(second_daemon, date=day(-1), source="list")
                newer = await run_ended(second_daemon, answer.json()["run_id"])
                both_here = await runs(second_daemon)
                newest = await runs(second_daemon, limit="1")
        async with open_ledger(environ(store, None)) as without_twilio:
            both_later = await runs(without_twilio)
            by_id = (await get(without_twilio, f"/v1/reconcile/runs/{older['run_id']}")).json()
            refused = await ask(without_twilio, date=day())
    assert after_restart == [older]
    assert both_here == both_later == [newer, older]
    assert newest == [newer]
    assert by_id == older
    assert refused.status_code == 503
    assert "twilio.account_sid" in refused.json()["error"]


async def test_a_run_that_loses_its_store_fails_and_the_daemon_goes_on(tmp_path: Path) -> None:
    """A run whose store can no longer be read (its file removed while the run waits on a
    throttled list page) ends `failed`, saying why, and the daemon goes on answering, as it
    does when a /v1 read or the poller meets the same (StoreUnreadable)."""
    with trio.fail_after(60):
        async with reconciling(tmp_path) as (sim, ledger):
            sim.throttle(until=math.inf)
            run_id = (await ask(ledger, date=day(), source="list")).json()["run_id"]
            await wait_until(lambda: sim.stats.requests_429 > 0)  # past its reads, listing
            ledger.store_path.unlink()
            sim.throttle(requests=0)
            report = await run_ended(ledger, run_id)
            # The report shows the end before its journaling, the commit that finds the
            # store gone, has finished: /healthz says so once it has.
            health = await ledger.client.get("/healthz")
            while health.status_code == 200:  # nothing in this process is told when it turns
                await trio.sleep(0.05)
                health = await ledger.client.get("/healthz")
    assert report["status"] == "failed" and report["reason"]
    assert health.status_code == 503


BAD_BODIES: list[tuple[object, str]] = [
    (b"not json", "body"),
    (b'{"date": "2024-05-01", "date": "2024-05-02"}', "date"),
    ([], "body"),
    ({}, "date"),
    ({"date": None}, "date"),
    ({"date": 20240501}, "date"),
    ({"date": "2024-5-01"}, "date"),
    ({"date": "20240501"}, "date"),
    ({"date": "2024-05-01T00:00:00"}, "date"),
    ({"date": "\u0662\u0660\u0662\u0664-\u0660\u0665-\u0660\u0661"}, "date"),  # Arabic digits
    ({"date": "2024-02-30"}, "date"),
    ({"date": "0000-01-01"}, "date"),
    ({"date": day(1)}, "date"),  # tomorrow
    ({"date": day(), "source": "bulk"}, "source"),
    ({"date": day(), "source": "LIST"}, "source"),
    ({"date": day(), "source": ""}, "source"),
    ({"date": day(), "source": 1}, "source"),
    ({"date": day(-1), "source": "export"}, "source"),  # Twilio exports a day two days on
    ({"date": day(), "colour": "red"}, "colour"),
]
BAD_QUERIES: list[tuple[str, str]] = [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=ten", "limit"),
    ("limit=-1", "limit"), ("limit=1&limit=2", "limit"), ("since=2024-05-01", "since"),
]


async def test_every_bad_request_is_400_naming_its_field(tmp_path: Path) -> None:
    """A date not strictly YYYY-MM-DD, not of the calendar or after today, a source not one
    of the three, `export` for a day Twilio cannot export yet, an unknown field, a body that
    is not one JSON object, and a bad runs query: each 400, naming the field. The edges are
    accepted: today, a day two days old by export, no source and a null one (auto)."""
    answered: list[tuple[object, int, object]] = []
    with trio.fail_after(60):
        async with reconciling(tmp_path) as (_, ledger):
            for body, field in BAD_BODIES:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                answer = await ledger.client.post("/v1/reconcile", content=content,
                                                  headers=BEARER)
                answered.append((body, answer.status_code, answer.json().get("field")))
                assert answer.status_code != 400 or field in answer.json()["error"]
            for query, _ in BAD_QUERIES:
                answer = await ledger.client.get(f"/v1/reconcile/runs?{query}", headers=BEARER)
                answered.append((query, answer.status_code, answer.json().get("field")))
            accepted = [(await ask(ledger, **body)).status_code for body in (
                {"date": day()}, {"date": day(), "source": None},
                {"date": day(-2), "source": "export"}, {"date": "2024-02-29", "source": "list"})]
    expected = [(body, 400, field) for body, field in [*BAD_BODIES, *BAD_QUERIES]]
    assert answered == expected
    assert accepted == [202, 202, 202, 202]


async def test_the_reconcile_routes_need_the_token_and_unknown_runs_are_404(
        tmp_path: Path) -> None:
    """Without the bearer token, or with another, each route is 401; a run_id no run has,
    or not of a run_id's shape, is 404."""
    wrong = {"Authorization": "Bearer not-the-token"}
    with trio.fail_after(60):
        async with reconciling(tmp_path) as (_, ledger):
            client = ledger.client
            unauthorized = [(await call).status_code for headers in ({}, wrong) for call in (
                client.post("/v1/reconcile", json={"date": day()}, headers=headers),
                client.get("/v1/reconcile/runs", headers=headers),
                client.get(f"/v1/reconcile/runs/{UNKNOWN_RUN}", headers=headers))]
            unknown = [(await get(ledger, f"/v1/reconcile/runs/{run_id}")).status_code
                       for run_id in (UNKNOWN_RUN, "RN" + "0" * 31, "RN" + "A" * 32, "nope")]
            still_none = await runs(ledger)
    assert unauthorized == [401] * 6
    assert unknown == [404] * 4
    assert still_none == []  # the refused requests started nothing


# ------------------------------------------------------------------ the CLI


def free_port() -> int:
    """A port free now, for a daemon the CLI can find by its configuration."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def cli(env: Mapping[str, str], *args: str) -> tuple[int, list[Any], str]:
    """`msgledger ARGS` as a child process: its exit code, its stdout's JSON lines (or the
    one indented document `status` prints), and its stderr."""
    done = await trio.run_process([sys.executable, "-m", "msgledger", *args], env=dict(env),
                                  capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode()
    printed = [json.loads(out)] if out.startswith("{\n") else [
        json.loads(line) for line in out.splitlines()]
    return done.returncode, printed, done.stderr.decode()


async def test_the_cli_asks_the_daemon_at_http_listen_and_waits(tmp_path: Path) -> None:
    """`msgledger reconcile` asks the daemon at `http.listen` with `api.token`: 0 with the
    daemon's answer; with `--wait`, 0 once the run is done, its report printed after the
    answer, and `status` shows it as the last reconcile; 2 for arguments the daemon refuses
    (400), a token it refuses (401), no token or a malformed date; 1 with one line when no
    daemon answers."""
    port = free_port()
    settings = {"MSGLEDGER_HTTP_LISTEN": f"127.0.0.1:{port}"}
    env = child_env(tmp_path / "cli.db", **settings)
    no_token = {k: v for k, v in env.items() if k != "MSGLEDGER_API_TOKEN"}
    with trio.fail_after(90):
        async with open_sim() as sim, open_ledger(environ(tmp_path / "cli.db", sim, **settings)):
            waited = await cli(env, "reconcile", "--date", day(), "--source", "list", "--wait")
            status = await cli(env, "status")
            asked = await cli(env, "reconcile", "--date", day(-1))
            future = await cli(env, "reconcile", "--date", day(1))
            wrong_token = await cli({**env, "MSGLEDGER_API_TOKEN": "wrong"}, "reconcile",
                                    "--date", day())
            tokenless = await cli(no_token, "reconcile", "--date", day())
            malformed = await cli(env, "reconcile", "--date", "2024-13-01")
        nobody = await cli(env, "reconcile", "--date", day())
    code, (answer, report), _ = waited
    assert code == 0 and report["run_id"] == answer["run_id"]
    assert (report["status"], report["source"]) == ("done", "list")
    assert status[0] == 0 and status[1][0]["last_reconcile"] == report
    assert asked[0] == 0 and asked[1][0].keys() == {"run_id", "status"}
    assert (future[0], future[1]) == (2, [])
    assert "HTTP 400" in future[2] and "date" in future[2] and future[2].count("\n") == 1
    assert wrong_token[0] == 2 and "HTTP 401" in wrong_token[2]
    assert tokenless[0] == 2 and "api.token" in tokenless[2]
    assert malformed[0] == 2 and "--date" in malformed[2]
    assert (nobody[0], nobody[1]) == (1, [])
    assert nobody[2].count("\n") == 1
    assert nobody[2].startswith(f"msgledger: no daemon answers at http://127.0.0.1:{port}")


async def test_the_cli_uses_the_admin_socket_and_exits_1_unless_done(tmp_path: Path) -> None:
    """With `http.admin_listen` a unix socket, `msgledger reconcile` asks there (`/v1` is
    served there only): 0 for a run done; 1 for a run that ended incomplete (Twilio refuses
    the credentials), its report printed; 1 for a daemon that cannot reconcile (503: no
    Twilio credentials), its reason printed."""
    admin = str(tmp_path / "admin.sock")
    settings = {"MSGLEDGER_HTTP_ADMIN_LISTEN": admin}
    env = child_env(tmp_path / "a.db", **settings)
    with trio.fail_after(90):
        async with open_sim() as sim, open_ledger(environ(tmp_path / "a.db", sim, **settings)):
            done = await cli(env, "reconcile", "--date", day(), "--wait")
        async with open_sim("another-token") as refusing, open_ledger(
                environ(tmp_path / "a.db", refusing, **settings)):
            incomplete = await cli(env, "reconcile", "--date", day(), "--wait")
        async with open_ledger(environ(tmp_path / "a.db", None, **settings)):
            unable = await cli(env, "reconcile", "--date", day())
    assert done[0] == 0 and done[1][1]["status"] == "done"
    assert incomplete[0] == 1 and incomplete[1][1]["status"] == "incomplete"
    assert "credentials" in incomplete[1][1]["reason"]
    assert (unable[0], unable[1]) == (1, [])
    assert "HTTP 503" in unable[2] and "twilio.account_sid" in unable[2]
