"""The outbound path end to end: `/v1/messages` through the real `twilio` client to the
simulator, and the simulator's signed callbacks back into the record."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.trio import serve

from msgledger import store
from msgledger.sim import OutcomeWeights, SimKnobs, Simulator, serve_sim

from .conftest import ACCOUNT_SID, API_TOKEN, AUTH_TOKEN, Ledger, daemon_environ, open_ledger
from .fake_twilio import answering

BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
FAST = (0.001, 0.005)  # seconds between a simulated message's statuses
ALWAYS_DELIVERED = OutcomeWeights(delivered=1, undelivered=0, failed=0)


@asynccontextmanager
async def sim_and_ledger(tmp_path: Path, *, api_base_url: str | None = None,
                         env: Mapping[str, str] | None = None,
                         **knobs: Any) -> AsyncIterator[tuple[Simulator, Ledger]]:
    """The simulator playing Twilio, and a daemon sending through it; `env` adds settings."""
    sim_knobs = SimKnobs(ACCOUNT_SID, AUTH_TOKEN,
                         **{"step_delay": FAST, "outcome_weights": ALWAYS_DELIVERED, "seed": 7,
                            **knobs})
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(partial(serve_sim, sim_knobs))
        environ = daemon_environ(tmp_path / "out.db", **{
            "MSGLEDGER_TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "MSGLEDGER_TWILIO_API_BASE_URL": api_base_url or sim.base_url,
            "MSGLEDGER_TWILIO_RETRY_BACKOFF": "10ms", "MSGLEDGER_POLLER_OVERDUE_AFTER": "1ms",
            **(env or {})})
        async with open_ledger(environ) as ledger:
            yield sim, ledger
        nursery.cancel_scope.cancel()


async def send(ledger: Ledger, **fields: str) -> httpx.Response:
    payload = {"to": "+15558675310", "from": "+15005550006", "body": "hello", **fields}
    return await ledger.client.post("/v1/messages", json=payload, headers=BEARER)


async def all_records(ledger: Ledger, **query: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursor: int | None = 0
    while cursor is not None:
        page = (await ledger.client.get("/v1/messages", headers=BEARER,
                                        params={**query, "cursor": cursor, "limit": 128})).json()
        records += page["messages"]
        cursor = page["next_cursor"]
    return records


def history(record: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(h["kind"], h.get("status")) for h in record["history"]]


async def test_500_messages_end_delivered_through_callbacks(tmp_path: Path,
                                                            workers: str) -> None:
    """Every message sent through /v1/messages is recorded before sending and ends
    `delivered` through the simulator's signed callbacks (with fronts: every request and
    callback crosses a link)."""
    codes: list[int] = []

    async def sender(sim_ledger: tuple[Simulator, Ledger], first: int) -> None:
        for n in range(first, 500, 25):
            codes.append((await send(sim_ledger[1], to=f"+1555000{n:04d}")).status_code)

    with trio.fail_after(120):
        async with sim_and_ledger(tmp_path, env={"MSGLEDGER_HTTP_WORKERS": workers}) as (
                sim, ledger):
            async with trio.open_nursery() as nursery:
                for first in range(25):
                    nursery.start_soon(sender, (sim, ledger), first)
            await sim.wait_idle()
            records = await all_records(ledger)
    assert codes == [201] * 500
    assert len(records) == 500 and sim.stats.callbacks_failed == 0
    assert {r["status"] for r in records} == {"delivered"}
    assert {tuple(history(r)) for r in records} == {(
        ("send_requested", "requested"), ("send_accepted", "queued"),
        ("callback", "sent"), ("callback", "delivered"))}
    assert {r["sid"] for r in records} == set(sim.messages)


async def test_rejected_send_stays_in_the_record(tmp_path: Path) -> None:
    """A create Twilio refuses is answered 422 and kept as an unsuccessful attempt."""
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path) as (_, ledger):
            response = await send(ledger, to="not-a-number", ref="bad-to")
            record = (await ledger.record("bad-to")).json()
    assert response.status_code == 422
    assert (record["status"], record["error_code"], record["sid"]) == ("rejected", "21211", None)
    assert record["final"] is True
    assert history(record) == [("send_requested", "requested"), ("send_rejected", "rejected")]
    # Our ref rides in the signed query; the fragment asks Twilio to retry 5xx and timeouts.
    assert record["history"][0]["data"]["status_callback"] == (
        f"{ledger.public_url}/twilio/status?ref=bad-to#rc=3&rp=ct,rt,5xx")


async def test_lost_answer_is_unknown_then_settled_by_its_callbacks(tmp_path: Path) -> None:
    """A create whose answer is lost is recorded `outcome_unknown` (202), never retried, and
    the callbacks carrying its ref then tie the SID to it."""
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path, lose_create_response=1.0) as (sim, ledger):
            response = await send(ledger, ref="lost-1")
            unknown = response.json()
            await sim.wait_idle()
            settled = (await ledger.record("lost-1")).json()
    assert response.status_code == 202
    assert ("send_unknown", "outcome_unknown") in history(unknown)
    assert sim.stats.messages_created == 1  # no second create: it could have sent twice
    [sid] = sim.messages
    assert (settled["sid"], settled["status"]) == (sid, "delivered")
    assert history(settled)[:2] == [("send_requested", "requested"),
                                    ("send_unknown", "outcome_unknown")]


async def test_429_is_retried_and_finally_recorded(tmp_path: Path) -> None:
    """Twilio's 429 (never processed) is retried with backoff; if it never stops the
    attempt is kept as rejected with HTTP 429."""
    with trio.fail_after(60):
        async with sim_and_ledger(tmp_path, rate_limit_429=0.3) as (sim, ledger):
            codes = [(await send(ledger)).status_code for _ in range(10)]
            some_429 = sim.stats.requests_429
            sim.knobs = dataclasses.replace(sim.knobs, rate_limit_429=1.0)
            refused = await send(ledger, ref="always-429")
    assert codes == [201] * 10 and some_429 > 0
    assert refused.status_code == 422
    outcome = refused.json()["history"][-1]
    assert (outcome["kind"], outcome["data"]["http_status"]) == ("send_rejected", 429)


async def test_unreachable_twilio_is_recorded_rejected(tmp_path: Path) -> None:
    """When no connection to Twilio can be made, the attempt is journaled, not dropped."""
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path, api_base_url="http://127.0.0.1:9") as (_, ledger):
            response = await send(ledger, ref="nowhere")
    assert response.status_code == 422
    record = response.json()
    assert record["status"] == "rejected"
    assert "unreachable" in record["history"][-1]["data"]["error_message"]


# A Twilio whose every answer is a 500: the request may or may not have been done.
_always_500 = answering(500, '{"code": 20500, "message": "Internal Server Error", "status": 500}')


async def test_5xx_is_unknown_and_never_retried(tmp_path: Path) -> None:
    """A 5xx may have created the message: it is journaled unknown (202), not retried."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    requests_seen: list[str] = []

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            requests_seen.append(scope["path"])
        await _always_500(scope, receive, send)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            [bound] = await nursery.start(partial(serve, counting, config))
            async with sim_and_ledger(tmp_path, api_base_url=bound) as (_, ledger):
                response = await send(ledger, ref="five-hundred")
            nursery.cancel_scope.cancel()
    assert response.status_code == 202
    assert response.json()["status"] == "outcome_unknown"
    assert len(requests_seen) == 1


def _problem_twilio(status: int) -> Any:
    """A Twilio that answers every request with an RFC 9457 problem body (the twilio
    library then raises TwilioServiceException, not TwilioRestException)."""
    body = ('{"type": "https://www.twilio.com/docs/errors/21211", "title": "Invalid To",'
            f' "status": {status}, "code": 21211, "detail": "not a number"}}')
    return answering(status, body, "application/problem+json")


async def test_an_rfc9457_refusal_is_recorded_like_any_other(tmp_path: Path) -> None:
    """twilio >= 9.11 raises TwilioServiceException for a problem-details body: a 400 is
    still a rejected send (422), a 503 an unknown one (202), never a 500 of ours."""
    answers = []
    for status in (400, 503):
        (tmp_path / str(status)).mkdir()
        config = Config()
        config.bind = ["127.0.0.1:0"]
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                [bound] = await nursery.start(partial(serve, _problem_twilio(status), config))
                async with sim_and_ledger(tmp_path / str(status), api_base_url=bound) as (
                        _, ledger):
                    response = await send(ledger, ref=f"problem-{status}")
                    record = (await ledger.record(f"problem-{status}")).json()
                nursery.cancel_scope.cancel()
        answers.append((response.status_code, record["status"], record["error_code"]))
    assert answers == [(422, "rejected", "21211"), (202, "outcome_unknown", None)]


async def test_bad_send_requests_are_400_and_send_nothing(tmp_path: Path) -> None:
    """Malformed or incomplete requests name the bad field; nothing is sent or journaled."""
    bad = [
        ({"to": "+1555", "body": "x"}, "from"),
        ({"to": "+1555", "from": "+1", "messaging_service_sid": "MG" + "0" * 32,
          "body": "x"}, "from"),
        ({"from": "+1", "body": "x"}, "to"),
        ({"to": "+1555", "from": "+1", "body": "x", "colour": "red"}, "colour"),
        ({"to": "+1555", "from": "+1", "body": "x", "ref": "has space"}, "ref"),
        (["not", "an", "object"], "body"),
    ]
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path) as (sim, ledger):
            answers = [await ledger.client.post("/v1/messages", json=p, headers=BEARER)
                       for p, _ in bad]
            malformed = await ledger.client.post("/v1/messages", content=b"{nope",
                                                 headers=BEARER)
            unauthorized = await ledger.client.post("/v1/messages", json=bad[0][0])
            listed = await all_records(ledger)
    assert [(a.status_code, a.json()["field"]) for a in answers] == [(400, f) for _, f in bad]
    assert (malformed.status_code, malformed.json()["field"]) == (400, "body")
    assert unauthorized.status_code == 401
    assert sim.stats.requests == 0 and listed == []


async def test_a_reused_ref_is_never_sent_twice(tmp_path: Path) -> None:
    """A retried request with the same ref gets 409 and the existing record."""
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path) as (sim, ledger):
            first = await send(ledger, ref="once")
            again = await send(ledger, ref="once")
    assert (first.status_code, again.status_code) == (201, 409)
    assert again.json()["sid"] == first.json()["sid"]
    assert sim.stats.messages_created == 1


async def test_concurrent_sends_of_one_ref_send_once(tmp_path: Path, workers: str) -> None:
    """Two requests racing with the same ref: one is sent, the other gets 409."""
    codes: list[int] = []
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path, latency=0.2,
                                  env={"MSGLEDGER_HTTP_WORKERS": workers}) as (sim, ledger):

            async def post() -> None:
                codes.append((await send(ledger, ref="raced")).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                nursery.start_soon(post)
    assert sorted(codes) == [201, 409]
    assert sim.stats.messages_created == 1


async def test_shutdown_mid_send_keeps_the_outcome(tmp_path: Path, workers: str) -> None:
    """A send still waiting for Twilio when the daemon drains past its graceful timeout
    still gets its outcome (the SID) journaled before the daemon stops."""
    drain_fast = {"MSGLEDGER_HTTP_GRACEFUL_TIMEOUT": "100ms", "MSGLEDGER_HTTP_WORKERS": workers}
    with trio.fail_after(30):
        async with (sim_and_ledger(tmp_path, env=drain_fast, latency=1.0) as (sim, ledger),
                    trio.open_nursery() as posting):
            posting.start_soon(_post_quietly, ledger.client, "/v1/messages")
            while sim.stats.requests == 0:  # the create is at Twilio, awaiting its answer
                await trio.testing.wait_all_tasks_blocked(0.01)
            ledger.stop.set()
    conn = store.connect(str(ledger.store_path), readonly=True)
    record = store.find_record(conn, "mid-send")
    conn.close()
    assert record is not None
    assert [h["kind"] for h in record["history"]][:2] == ["send_requested", "send_accepted"]
    assert record["sid"] in sim.messages


async def _post_quietly(client: httpx.AsyncClient, url: str) -> None:
    """Send one message; the daemon may cut the answer off while it drains."""
    payload = {"to": "+15558675310", "from": "+15005550006", "body": "x", "ref": "mid-send"}
    with contextlib.suppress(httpx.HTTPError):
        await client.post(url, headers=BEARER, json=payload)


async def test_register_is_idempotent_and_collects_callbacks(tmp_path: Path) -> None:
    """An app registers what it sent itself; registering again changes nothing."""
    sid = "SM" + "ab" * 16
    payload = {"sid": sid, "to": "+15558675310", "from": "+15005550006", "status": "queued",
               "ref": "app-7", "body": "sent by the app"}
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path) as (_, ledger):
            first = await ledger.client.post("/v1/messages/register", json=payload,
                                             headers=BEARER)
            again = await ledger.client.post("/v1/messages/register", json=payload,
                                             headers=BEARER)
            bad = await ledger.client.post("/v1/messages/register",
                                           json={**payload, "sid": "XX1"}, headers=BEARER)
    assert (first.status_code, again.status_code, bad.status_code) == (201, 200, 400)
    record = again.json()
    assert history(record) == [("register", "queued")]
    assert (record["ref"], record["body"], record["status"]) == ("app-7", "sent by the app",
                                                                  "queued")


async def test_list_filters_by_status_and_overdue(tmp_path: Path) -> None:
    """`status` and `overdue` select records; a message stuck at `sent` is overdue."""
    stuck = OutcomeWeights(delivered=0, undelivered=0, failed=0, sent=1)
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path) as (sim, ledger):
            await send(ledger, ref="delivered-1")
            await sim.wait_idle()
            sim.knobs = dataclasses.replace(sim.knobs, outcome_weights=stuck)
            await send(ledger, ref="stuck-1")
            await sim.wait_idle()
            await send(ledger, to="bad", ref="rejected-1")
            delivered = await all_records(ledger, status="delivered")
            overdue = await all_records(ledger, overdue="true")
            everything = await all_records(ledger)
    assert [r["ref"] for r in delivered] == ["delivered-1"]
    assert [r["ref"] for r in overdue] == ["stuck-1"]
    assert len(everything) == 3


async def test_keep_body_hash_keeps_only_the_hash(tmp_path: Path) -> None:
    """With store.keep_body = "hash" the body never reaches the store, its SHA-256 does."""
    with trio.fail_after(30):
        async with sim_and_ledger(tmp_path, env={"MSGLEDGER_STORE_KEEP_BODY": "hash"}) as (
                _, ledger):
            record = (await send(ledger, body="secret text")).json()
    assert record["body"] is None
    assert record["body_sha256"] == hashlib.sha256(b"secret text").hexdigest()
    assert b"secret text" not in ledger.store_path.read_bytes()
