"""Hostile input at the edge: whatever a client sends, the answer is a 4xx naming what is
wrong (never a 500), nothing is journaled for it, and the daemon carries on."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import structlog
import trio
import trio.testing

from msgledger import store
from msgledger.deadlines import AckDeadlines
from msgledger.events import Submission
from msgledger.http import payloads
from msgledger.http.signature import SignatureChecker
from msgledger.http.state import ServerState
from msgledger.http.webhooks import FORM_TYPE, WebhookReceiver
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics

from .conftest import (
    API_TOKEN,
    AUTH_TOKEN,
    Ledger,
    callback_params,
    daemon_environ,
    new_sid,
    open_ledger,
    signed,
)

BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
JSON_TYPE = {"Content-Type": "application/json"}
LONE = "\ud83d"  # the first half of 😀: a string cut in the middle of an emoji
SEND = {"to": "+15558675310", "from": "+15005550006", "body": "hello", "ref": "order-1"}


def registration(**fields: Any) -> dict[str, Any]:
    return {"sid": "SM" + "ab" * 16, "to": "+15558675310", "from": "+15005550006",
            "status": "queued", "ref": "app-7", "body": "sent by the app", **fields}


def journal_rows(ledger: Ledger) -> list[tuple[str | None, str | None, dict[str, Any]]]:
    """(sid, ref, data) of every journal row, in order."""
    conn = store.connect(str(ledger.store_path), readonly=True)
    try:
        rows = conn.execute("SELECT sid, ref, data FROM journal ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(sid, ref, json.loads(data)) for sid, ref, data in rows]


async def post_json(ledger: Ledger, path: str, payload: object) -> httpx.Response:
    """POST `payload` as JSON with \\u escapes, so lone surrogates survive the encoding."""
    return await ledger.client.post(path, content=json.dumps(payload).encode(),
                                    headers={**BEARER, **JSON_TYPE})


async def post_raw(ledger: Ledger, path: str, body: bytes) -> httpx.Response:
    return await ledger.client.post(path, content=body, headers={**BEARER, **JSON_TYPE})


def answers(responses: list[httpx.Response]) -> list[tuple[int, str | None]]:
    return [(r.status_code, r.json().get("field")) for r in responses]


# ------------------------------------------------------------------ text that UTF-8 cannot hold


async def test_lone_surrogates_are_400_naming_the_field(ledger: Ledger) -> None:
    """A lone surrogate in any string field of either POST route is refused at the edge,
    naming that field; the journal never sees it and goes on taking the next request."""
    service = {k: v for k, v in SEND.items() if k != "from"}
    service["messaging_service_sid"] = "MG" + "0" * 32
    cases: list[tuple[str, dict[str, Any], str]] = [
        *[("/v1/messages", SEND, name) for name in ("to", "from", "body", "ref")],
        ("/v1/messages", service, "messaging_service_sid"),
        *[("/v1/messages/register", registration(), name)
          for name in ("sid", "to", "from", "status", "ref", "body")],
    ]
    with trio.fail_after(20):
        got = [await post_json(ledger, path, {**base, name: base[name] + LONE})
               for path, base, name in cases]
        after = await post_json(ledger, "/v1/messages/register", registration())
    assert answers(got) == [(400, name) for _, _, name in cases]
    assert "lone surrogate" in got[0].json()["error"]
    assert after.status_code == 201
    assert len(journal_rows(ledger)) == 1


@pytest.mark.parametrize("name", sorted(payloads.LIST_PARAMETERS))
def test_lone_surrogates_in_query_parameters_are_invalid(name: str) -> None:
    """A query value UTF-8 cannot hold names its parameter. (Quart decodes percent-escapes
    with replacement, so this guards the rule rather than a path seen over HTTP.)"""
    with pytest.raises(payloads.Invalid) as refused:
        payloads.list_query([(name, "1" + LONE)])
    assert refused.value.field == name


def test_a_hostile_field_name_is_quoted_cleanly() -> None:
    """An unknown field named with a lone surrogate is named back as printable UTF-8."""
    with pytest.raises(payloads.Invalid) as refused:
        payloads.registration({**registration(), LONE * 100: "x"})
    assert refused.value.field == "\\ud83d" * 10 + "\\ud8"
    refused.value.field.encode("utf-8")


# ------------------------------------------------------------------ query strings


async def test_query_values_out_of_range_are_400(ledger: Ledger) -> None:
    """Unicode digits, numbers past int()'s 4,300-digit limit, instants that leave the
    calendar once their offset is applied, and repeated parameters name the parameter."""
    cases = [
        ("limit=%C2%B2", "limit"),  # '²' passes str.isdigit, not int()
        ("cursor=%C2%B3", "cursor"),
        ("cursor=" + "9" * 5000, "cursor"),
        ("limit=+5", "limit"),
        ("until=0001-01-01T00:00:00%2B01:00", "until"),
        ("since=9999-12-31T23:59:59-01:00", "since"),
        ("limit=10&limit=20", "limit"),
        ("colour=red&colour=blue", "colour"),
    ]
    with trio.fail_after(20):
        got = [await ledger.client.get(f"/v1/messages?{query}", headers=BEARER)
               for query, _ in cases]
        fine = await ledger.client.get("/v1/messages?limit=1000&since=2026-01-01T00:00:00Z",
                                       headers=BEARER)
    assert answers(got) == [(400, field) for _, field in cases]
    assert fine.status_code == 200


# ------------------------------------------------------------------ bodies


def nested(depth: int) -> bytes:
    return b'{"to":' * depth + b"1" + b"}" * depth


MALFORMED_BODIES = [
    b"\xc3\x28",  # invalid UTF-8
    json.dumps(SEND).encode("utf-16"),
    b"\xef\xbb\xbf" + json.dumps(SEND).encode(),  # a UTF-8 byte order mark
    b"[" * 5000 + b"]" * 5000,
    nested(5000),
    b'{"to": ' + b"1" * 5000 + b"}",  # int() refuses 5,000 digits
    b"",
    b"{nope",
    b"[]", b'"x"', b"1", b"null", b"true",
]


async def test_malformed_bodies_are_400_naming_body(ledger: Ledger) -> None:
    """Bodies that are not UTF-8, not JSON, nested past the parser or not an object get 400
    naming `body` on both POST routes, and nothing is journaled."""
    with trio.fail_after(30):
        got = [await post_raw(ledger, path, body) for body in MALFORMED_BODIES
               for path in ("/v1/messages", "/v1/messages/register")]
    assert answers(got) == [(400, "body")] * len(got)
    assert journal_rows(ledger) == []


async def test_ambiguous_or_oversized_bodies_are_refused(ledger: Ledger) -> None:
    """A repeated key is refused naming it (a proxy may have checked the other value),
    `null` for a required field is a missing field, and a body over 64 KiB is 413."""
    repeated = b'{"to":"+1555","to":"+1666","from":"+1","body":"x"}'
    big = registration(status="x" * (100 * 1024))
    with trio.fail_after(20):
        got = [await post_raw(ledger, "/v1/messages", repeated),
               await post_raw(ledger, "/v1/messages/register",
                              repeated.replace(b'"body"', b'"sid"')),
               await post_json(ledger, "/v1/messages/register", registration(to=None)),
               await post_json(ledger, "/v1/messages", {**SEND, "ref": 1e400})]
        too_big = await post_json(ledger, "/v1/messages/register", big)
    assert answers(got) == [(400, "to"), (400, "to"), (400, "to"), (400, "ref")]
    assert too_big.status_code == 413
    assert journal_rows(ledger) == []


async def test_hostile_paths_and_methods_never_get_a_500(ledger: Ledger) -> None:
    """NUL and very long keys, and every method on every route, with or without the token,
    get a 4xx (or the route's answer), never a 5xx; the daemon answers normally after."""
    paths = ["/v1/messages", "/v1/messages/register", "/v1/messages/%00",
             "/v1/messages/" + "k" * 8000, "/v1/messages/%ED%A0%80", "/twilio/status",
             "/twilio/debugger", "/v1//messages", "/v1/messages/"]
    methods = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "POST"]
    codes: dict[tuple[str, str, bool], int] = {}
    with trio.fail_after(60):
        for path in paths:
            for method in methods:
                for headers in ({}, BEARER):
                    response = await ledger.client.request(method, path, headers=headers,
                                                           content=b"{}")
                    codes[(method, path[:30], bool(headers))] = response.status_code
        after = await post_json(ledger, "/v1/messages/register", registration())
    assert {key: code for key, code in codes.items() if code >= 500} == {}
    assert codes[("GET", "/v1/messages/%00", True)] == 404
    assert after.status_code == 201


async def read_response(stream: trio.SocketStream) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some()
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += await stream.receive_some()
    return head + b"\r\n\r\n" + rest


async def test_an_early_answer_does_not_wedge_its_connection(ledger: Ledger) -> None:
    """A /v1 request answered before its body has arrived (401: no token) leaves its
    keep-alive connection answering, or closes it; the next request on it never hangs (as
    it did when quart-trio's cancellation cut hypercorn's close short)."""
    host, port = ledger.url.removeprefix("http://").rsplit(":", 1)
    body = b'{"to": "+15558675310"}'
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: ledger\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    with trio.fail_after(10):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(head)
            first = await read_response(stream)  # answered on the head alone
            # Let the server finish with that answer (closing, or not) before the body comes:
            # nothing tells a client when it has, so this waits a little in real time.
            await trio.sleep(0.05)
            try:
                await stream.send_all(body + b"GET /healthz HTTP/1.1\r\nHost: ledger\r\n\r\n")
                second = await stream.receive_some()
            except trio.BrokenResourceError:  # closed: a client opens another
                second = b""
    assert first.startswith(b"HTTP/1.1 401")
    assert second == b"" or second.startswith(b"HTTP/1.1 200")


# ------------------------------------------------------------------ the Debugger webhook


async def post_alert(ledger: Ledger, payload: str) -> httpx.Response:
    alert = {"Sid": "NO" + "a" * 32, "AccountSid": "AC" + "1" * 32, "Level": "Error",
             "Payload": payload}
    path = "/twilio/debugger"
    return await ledger.client.post(path, content=urlencode(alert),
                                    headers=signed(ledger.public_url + path, alert))


async def test_a_debugger_alert_naming_no_valid_sid_is_journaled_alone(ledger: Ledger) -> None:
    """A signed alert whose Payload names something that is not a message SID (a lone
    surrogate in it, one digit short), is nested past the JSON parser or is not JSON at all
    is journaled on its own (200), its Payload verbatim, linking no message."""
    payloads_sent = ['{"resource_sid":"SM\\ud800"}',
                     '{"resource_sid":"SM' + "a" * 31 + '"}',
                     '{"resource_sid":"' + new_sid() + 'x"}',
                     "[" * 3000 + "]" * 3000,
                     "not json"]
    with trio.fail_after(20):
        got = [(await post_alert(ledger, p)).status_code for p in payloads_sent]
        listed = (await ledger.client.get("/v1/messages", headers=BEARER)).json()
    assert got == [200] * len(payloads_sent)
    rows = journal_rows(ledger)
    assert [sid for sid, _, _ in rows] == [None] * len(payloads_sent)
    assert [dict(map(tuple, data["params"]))["Payload"] for _, _, data in rows] == payloads_sent
    assert listed["messages"] == []


# ------------------------------------------------------------------ refs and SIDs


async def test_refs_shaped_like_sids_are_refused(ledger: Ledger) -> None:
    """A ref that could be taken for a SID (SM or MM and 32 hex digits, any case) is
    refused on both POST routes, so GET /v1/messages/{key} can never find the wrong one."""
    shapes = ["SM" + "ab" * 16, "mm" + "AB" * 16, "Sm" + "0" * 32]
    with trio.fail_after(20):
        got = [await post_json(ledger, path, {**base, "ref": ref}) for ref in shapes
               for path, base in (("/v1/messages", SEND), ("/v1/messages/register",
                                                           registration(sid=new_sid())))]
        near = await post_json(ledger, "/v1/messages/register", registration(
            ref="SM" + "ab" * 16 + "-1"))
    assert answers(got) == [(400, "ref")] * len(got)
    assert near.status_code == 201


async def test_a_callback_ref_shaped_like_a_sid_links_nothing(ledger: Ledger) -> None:
    """A status callback whose URL says ?ref=<a SID> (a StatusCallback set by someone else)
    is kept, but that ref is not indexed: looking up the other SID never finds it."""
    sid, other = new_sid(), new_sid()
    with trio.fail_after(20):
        response = await ledger.post_status(callback_params(sid, "sent"), ref=other)
        looked_up = await ledger.record(other)
        record = (await ledger.record(sid)).json()
    assert response.status_code == 200
    assert looked_up.status_code == 404
    assert record["ref"] is None
    [(row_sid, row_ref, data)] = journal_rows(ledger)
    assert (row_sid, row_ref) == (sid, None)
    assert data["url"].endswith(f"?ref={other}")


async def test_registering_a_sid_again_differently_is_409(ledger: Ledger) -> None:
    """The same registration again is idempotent (200); another ref, status, number or
    body for a known SID is 409 naming the field, and journals nothing."""
    first = registration()
    changes = [{"ref": "app-8"}, {"status": "sent"}, {"to": "+15550000000"},
               {"from": "+15550000001"}, {"body": "another text"}]
    with trio.fail_after(20):
        created = await post_json(ledger, "/v1/messages/register", first)
        again = await post_json(ledger, "/v1/messages/register", first)
        omitted = await post_json(ledger, "/v1/messages/register",
                                  {k: v for k, v in first.items() if k not in ("ref", "body")})
        got = [await post_json(ledger, "/v1/messages/register", {**first, **change})
               for change in changes]
    assert (created.status_code, again.status_code, omitted.status_code) == (201, 200, 200)
    assert answers(got) == [(409, next(iter(change))) for change in changes]
    assert got[0].json()["ref"] == "app-7"
    assert len(journal_rows(ledger)) == 1


async def test_registering_with_another_ref_than_a_callback_gave_is_409(
        ledger: Ledger) -> None:
    """A SID first seen in a callback carrying our ref cannot be registered under another
    ref (the store would drop it silently); under the same ref, or none, it can."""
    sid = new_sid()
    with trio.fail_after(20):
        await ledger.post_status(callback_params(sid, "sent"), ref="app-1")
        other = await post_json(ledger, "/v1/messages/register",
                                registration(sid=sid, ref="app-2"))
        same = await post_json(ledger, "/v1/messages/register",
                               registration(sid=sid, ref="app-1"))
    assert answers([other]) == [(409, "ref")]
    assert same.status_code == 201
    assert same.json()["status"] == "sent"  # the callback's status, ahead of "queued"


# ------------------------------------------------------------------ webhook outcomes counted


async def test_a_503_is_counted(tmp_path: Path, workers: str) -> None:
    """A callback the journal cannot make durable in time (another process holds the
    store's write lock) is answered 503 and counted as such."""
    environ = daemon_environ(tmp_path / "locked.db", MSGLEDGER_HTTP_WORKERS=workers,
                             MSGLEDGER_HTTP_ACK_TIMEOUT="200ms")
    with trio.fail_after(30):
        async with open_ledger(environ) as ledger:
            locker = sqlite3.connect(ledger.store_path, isolation_level=None)
            try:
                locker.execute("BEGIN IMMEDIATE")  # as a backup tool or sqlite3 shell may
                response = await ledger.post_status(callback_params(new_sid(), "sent"))
            finally:
                locker.close()
            await ledger.metrics_showing(
                'msgledger_callbacks_total{outcome="503",route="status"} 1.0')
    assert response.status_code == 503


def bare_receiver(metrics: Metrics) -> WebhookReceiver:
    intake, _ = trio.open_memory_channel[Submission](1)
    return WebhookReceiver(JournalClient(intake, AckDeadlines(1.0)), SignatureChecker(AUTH_TOKEN),
                           state=ServerState(public_url="http://ledger.test"),
                           max_body=65536, metrics=metrics)


def form_scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/twilio/status", "query_string": b"",
            "raw_path": b"/twilio/status", "headers": [(b"content-type", FORM_TYPE)]}


async def test_an_unexpected_error_is_a_counted_500() -> None:
    """An exception the receiver does not expect (here the server's receive fails) is
    answered 500 by the receiver itself, counted, and logged once as callback_failed."""
    metrics, sent = Metrics(), list[Mapping[str, Any]]()

    async def receive() -> Any:
        raise RuntimeError("the transport went away")

    async def send(message: Any) -> None:
        sent.append(message)

    with trio.fail_after(5), structlog.testing.capture_logs() as logged:
        await bare_receiver(metrics)(form_scope(), receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {"error": "internal error"}
    assert b'msgledger_callbacks_total{outcome="500",route="status"} 1.0' in metrics.render()
    assert [(e["event"], e.get("error")) for e in logged] == [("callback_failed",
                                                               "RuntimeError")]


async def test_an_answer_that_cannot_be_sent_is_still_counted() -> None:
    """When the server cannot send the answer (the client went away), the outcome is
    counted all the same and the server's error is left to the server."""
    metrics = Metrics()

    async def receive() -> Any:
        return {"type": "http.request", "body": b"MessageSid=SM1", "more_body": False}

    async def send(message: Any) -> None:
        raise OSError("connection reset")

    with trio.fail_after(5), pytest.raises(OSError):
        await bare_receiver(metrics)(form_scope(), receive, send)  # type: ignore[arg-type]
    assert b'msgledger_callbacks_total{outcome="403",route="status"} 1.0' in metrics.render()


async def test_cancellation_passes_through_the_receiver(
        autojump_clock: trio.testing.MockClock) -> None:
    """A request cancelled mid-way (shutdown) is neither answered nor counted: the receiver
    never swallows trio.Cancelled."""
    metrics, sent = Metrics(), list[Mapping[str, Any]]()

    async def receive() -> Any:
        await trio.sleep_forever()

    async def send(message: Any) -> None:
        sent.append(message)

    with trio.move_on_after(1) as waited:
        await bare_receiver(metrics)(form_scope(), receive, send)  # type: ignore[arg-type]
    assert waited.cancelled_caught
    assert sent == []
    assert b"msgledger_callbacks_total{" not in metrics.render()


# ------------------------------------------------------------------ fronts check the token


async def test_fronts_refuse_v1_without_the_token_before_reading_the_body(
        tmp_path: Path) -> None:
    """With fronts, a /v1 request without the bearer token is answered 401 by the front
    before its body is read: one over the relay's 1 MiB limit gets 401, not 413, so it was
    never relayed. With the token the limit still holds; /metrics needs no token."""
    huge = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    environ = daemon_environ(tmp_path / "fronts.db", MSGLEDGER_HTTP_WORKERS="2")
    with trio.fail_after(30):
        async with open_ledger(environ) as ledger:
            client = ledger.client
            anonymous = await client.post("/v1/messages/register", content=huge,
                                          headers=JSON_TYPE)
            wrong = await client.post("/v1/messages", content=huge, headers={
                **JSON_TYPE, "Authorization": "Bearer nope"})
            slashes = await client.post(f"{ledger.url}//v1//messages", content=huge,
                                        headers=JSON_TYPE)
            with_token = await client.post("/v1/messages/register", content=huge,
                                           headers={**BEARER, **JSON_TYPE})
            metrics = await client.get("/metrics")
    codes = [r.status_code for r in (anonymous, wrong, slashes, with_token, metrics)]
    assert codes == [401, 401, 401, 413, 200]
    assert anonymous.json() == {"error": "missing or wrong bearer token"}


async def test_fronts_refuse_v1_when_no_token_is_configured(tmp_path: Path) -> None:
    """Without api.token a front lets no /v1 request through, as the main process does:
    not even its body is read (401, not 413)."""
    huge = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    environ = {k: v for k, v in daemon_environ(tmp_path / "open.db").items()
               if k != "MSGLEDGER_API_TOKEN"}
    environ["MSGLEDGER_HTTP_WORKERS"] = "2"
    with trio.fail_after(30):
        async with open_ledger(environ) as ledger:
            guessed = await ledger.client.post("/v1/messages", content=huge, headers={
                **JSON_TYPE, "Authorization": "Bearer anything"})
            none = await ledger.client.post("/v1/messages", content=huge, headers=JSON_TYPE)
    assert (guessed.status_code, none.status_code) == (401, 401)
