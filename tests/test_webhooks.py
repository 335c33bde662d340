"""The webhook receiver end to end: a real daemon, real HTTP, a real SQLite file."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import structlog
import trio

from msgledger import store
from msgledger.deadlines import AckDeadlines
from msgledger.events import Event, Submission
from msgledger.http.clients import ClientResolver
from msgledger.http.signature import SignatureChecker
from msgledger.http.state import ServerState
from msgledger.http.webhooks import FORM_TYPE, WebhookReceiver
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics

from .conftest import (
    API_TOKEN,
    AUTH_TOKEN,
    FORM,
    Ledger,
    callback_params,
    daemon_environ,
    new_sid,
    open_ledger,
    signed,
)


def journal_size(ledger: Ledger) -> int:
    conn = store.connect(str(ledger.store_path), readonly=True)
    try:
        return store.journal_size(conn)
    finally:
        conn.close()


async def test_signed_callback_is_journaled_and_readable(ledger: Ledger) -> None:
    """A signed callback gets 200, and its record shows the status and a callback history."""
    sid = new_sid()
    with trio.fail_after(10):
        response = await ledger.post_status(callback_params(sid, "sent"), ref="order-1")
        assert response.status_code == 200
        record = (await ledger.record(sid)).json()
    assert record["sid"] == sid and record["ref"] == "order-1"
    assert record["status"] == "sent" and record["to"] == "+15558675310"
    [entry] = record["history"]
    assert (entry["seq"], entry["source"], entry["status"]) == (1, "callback", "sent")
    assert ["ApiVersion", "2010-04-01"] in entry["data"]["params"]
    assert (await ledger.record("order-1")).json()["sid"] == sid


async def test_state_never_goes_backwards(ledger: Ledger) -> None:
    """A late `sent` after `delivered` is journaled but leaves the status at delivered."""
    sid = new_sid()
    with trio.fail_after(10):
        for status in ("delivered", "sent", "queued"):
            assert (await ledger.post_status(callback_params(sid, status))).status_code == 200
        record = (await ledger.record(sid)).json()
    assert record["status"] == "delivered"
    assert [h["status"] for h in record["history"]] == ["delivered", "sent", "queued"]


async def test_unknown_status_and_parameters_are_kept(ledger: Ledger) -> None:
    """Statuses and parameters msgledger does not know are stored verbatim, not refused."""
    sid = new_sid()
    params = callback_params(sid, "teleported", BrandNewParam="x y&z", Empty="")
    with trio.fail_after(10):
        assert (await ledger.post_status(params)).status_code == 200
        record = (await ledger.record(sid)).json()
    assert record["status"] == "teleported"
    pairs = record["history"][0]["data"]["params"]
    assert ["BrandNewParam", "x y&z"] in pairs and ["Empty", ""] in pairs


async def test_forged_or_missing_signature_is_403_and_journals_nothing(ledger: Ledger) -> None:
    """Unsigned or wrongly signed callbacks are refused before anything is written."""
    params = callback_params(new_sid(), "delivered")
    with trio.fail_after(10):
        forged = await ledger.post_status(params, token="not-the-token")
        missing = await ledger.client.post("/twilio/status", content=urlencode(params),
                                           headers=FORM)
        tampered_headers = signed(ledger.public_url + "/twilio/status", params)
        tampered = await ledger.client.post(
            "/twilio/status", headers=tampered_headers,
            content=urlencode({**params, "MessageStatus": "failed"}))
    assert (forged.status_code, missing.status_code, tampered.status_code) == (403, 403, 403)
    assert journal_size(ledger) == 0


async def test_missing_required_fields_is_400(ledger: Ledger) -> None:
    """A signed callback without MessageSid or MessageStatus is refused with 400."""
    with trio.fail_after(10):
        no_status = await ledger.post_status({"MessageSid": new_sid()})
        no_sid = await ledger.post_status({"MessageStatus": "sent"})
    assert (no_status.status_code, no_sid.status_code) == (400, 400)
    assert "MessageStatus" in no_status.json()["error"]
    assert journal_size(ledger) == 0


async def test_wrong_content_type_is_415(ledger: Ledger) -> None:
    """A JSON body is not a Twilio status callback."""
    with trio.fail_after(10):
        response = await ledger.client.post("/twilio/status", json={"MessageSid": "SM1"})
    assert response.status_code == 415


async def test_oversized_body_is_413(ledger: Ledger) -> None:
    """Bodies over http.max_body_bytes are refused, declared or streamed."""
    big = urlencode(callback_params(new_sid(), "sent", Pad="x" * 70_000))

    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192].encode()

    with trio.fail_after(10):
        declared = await ledger.client.post("/twilio/status", content=big, headers=FORM)
        async with ledger.client.stream("POST", "/twilio/status", content=chunks(),
                                        headers=FORM) as streamed:
            assert streamed.status_code == 413
    assert declared.status_code == 413
    assert journal_size(ledger) == 0


async def test_signature_uses_the_public_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Behind a proxy, signatures are checked against http.public_url, not the bound address."""
    environ = daemon_environ(tmp_path / "p.db",
                           MSGLEDGER_HTTP_PUBLIC_URL="https://ledger.example.com")
    async with open_ledger(environ) as ledger:
        params = callback_params(new_sid(), "sent")
        with trio.fail_after(10):
            path = "/twilio/status?ref=abc"
            as_bound = await ledger.client.post(path, content=urlencode(params),
                                                headers=signed(ledger.url + path, params))
            as_public = await ledger.client.post(
                path, content=urlencode(params),
                headers=signed("https://ledger.example.com:443" + path, params))
        assert as_bound.status_code == 403
        assert as_public.status_code == 200


async def test_debugger_alert_links_to_its_message(ledger: Ledger) -> None:
    """A Debugger alert naming a message SID lands in that message's history."""
    sid = new_sid()
    alert = {"Sid": "NO" + "a" * 32, "AccountSid": "AC" + "1" * 32, "Level": "Error",
             "Timestamp": "2026-11-26T10:00:00Z", "PayloadType": "application/json",
             "Payload": f'{{"resource_sid": "{sid}", "error_code": "30003"}}'}
    path = "/twilio/debugger"
    with trio.fail_after(10):
        await ledger.post_status(callback_params(sid, "sent"))
        response = await ledger.client.post(path, content=urlencode(alert),
                                            headers=signed(ledger.public_url + path, alert))
        record = (await ledger.record(sid)).json()
    assert response.status_code == 200
    assert [h["source"] for h in record["history"]] == ["callback", "debugger"]
    assert record["status"] == "sent"


async def test_v1_requires_the_bearer_token(ledger: Ledger) -> None:
    """/v1 answers 401 without the configured bearer token, 404 for an unknown message."""
    with trio.fail_after(10):
        anonymous = await ledger.client.get("/v1/messages/x")
        wrong = await ledger.client.get("/v1/messages/x", headers={"Authorization": "Bearer no"})
        unknown = await ledger.client.get("/v1/messages/x",
                                          headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert (anonymous.status_code, wrong.status_code, unknown.status_code) == (401, 401, 404)


async def test_healthz_and_metrics(ledger: Ledger) -> None:
    """/healthz says ready; /metrics counts callbacks by outcome."""
    with trio.fail_after(10):
        await ledger.post_status(callback_params(new_sid(), "sent"))
        await ledger.post_status(callback_params(new_sid(), "sent"), token="bad")
        health = await ledger.client.get("/healthz")
        metrics = await ledger.metrics_showing(
            'msgledger_callbacks_total{outcome="200",route="status"} 1.0',
            'msgledger_callbacks_total{outcome="403",route="status"} 1.0')
    assert (health.status_code, health.json()["status"]) == (200, "ready")
    assert health.json()["worker"] in ((0,) if ledger.workers == 1 else (1, 2))
    assert "msgledger_journal_commit_seconds_count 1.0" in metrics


async def test_concurrent_callbacks_are_group_committed(ledger: Ledger) -> None:
    """Many callbacks in flight share commits, and every one of them is journaled."""
    sids = [new_sid() for _ in range(200)]
    codes: list[int] = []

    async def post(sid: str) -> None:
        codes.append((await ledger.post_status(callback_params(sid, "delivered"))).status_code)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for sid in sids:
                nursery.start_soon(post, sid)
        metrics = (await ledger.client.get("/metrics")).text
    assert codes == [200] * len(sids)
    assert journal_size(ledger) == len(sids)
    commits = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("msgledger_journal_commit_seconds_count"))
    assert commits < len(sids)  # some commits carried more than one event


async def test_webhooks_off_means_no_webhook_routes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With http.webhooks = false and no auth token, /twilio/* does not exist: a callback
    signed with an empty key gets 404, not 200."""
    environ = {k: v for k, v in daemon_environ(tmp_path / "off.db").items()
               if k != "MSGLEDGER_TWILIO_AUTH_TOKEN"}
    environ["MSGLEDGER_HTTP_WEBHOOKS"] = "false"
    async with open_ledger(environ) as ledger:
        with trio.fail_after(10):
            response = await ledger.post_status(callback_params(new_sid(), "sent"), token="")
        assert response.status_code == 404
        assert journal_size(ledger) == 0


async def test_host_differing_in_case_only_is_tried(tmp_path, workers: str) -> None:  # type: ignore[no-untyped-def]
    """Twilio signs the URL as typed in its console: a host spelled LEDGER.example.com there
    passes against ledger.example.com in http.public_url when the Host header spells it so,
    and is kept as signed. Another host never passes, Host header or not."""
    public = "http://ledger.example.com:8443"
    environ = daemon_environ(tmp_path / "h.db", MSGLEDGER_HTTP_PUBLIC_URL=public,
                             MSGLEDGER_HTTP_WORKERS=workers)
    path = "/twilio/status"

    async def post(signed_for: str, host: str) -> int:
        params = callback_params(sid, "sent")
        headers = {**signed(f"http://{signed_for}:8443{path}", params), "Host": f"{host}:8443"}
        response = await ledger.client.post(path, content=urlencode(params), headers=headers)
        return response.status_code

    async with open_ledger(environ) as ledger:
        sid = new_sid()
        with trio.fail_after(10):
            codes = [await post("LEDGER.example.com", "LEDGER.example.com"),
                     await post("LEDGER.example.com", "ledger.example.com"),  # Host says no
                     await post("other.example.com", "other.example.com"),
                     await post("other.example.com", "ledger.example.com")]
            record = (await ledger.record(sid)).json()
    assert codes == [200, 403, 403, 403]
    [entry] = record["history"]
    assert entry["data"]["url"] == f"http://LEDGER.example.com:8443{path}"
    assert entry["data"]["client"] == "127.0.0.1"


class CountingChecker(SignatureChecker):
    def __init__(self) -> None:
        super().__init__(AUTH_TOKEN)
        self.urls: list[str] = []

    def check(self, url: str, *args: Any, **kwargs: Any) -> bool:
        self.urls.append(url)
        return super().check(url, *args, **kwargs)


async def receive_one(host: bytes, signed_for: str, user_agent: bytes,
                      ) -> tuple[int, list[str], list[dict[str, Any]], list[Event]]:
    """One callback through a bare receiver whose journal acks at once: the status, the
    URLs checked, the log lines and the events handed to the journal."""
    checker, metrics = CountingChecker(), Metrics()
    intake, inbox = trio.open_memory_channel[Submission](1)
    receiver = WebhookReceiver(JournalClient(intake, AckDeadlines(5.0)), checker,
                               state=ServerState(public_url="https://ledger.test"),
                               max_body=65536, metrics=metrics,
                               clients=ClientResolver(["10.0.0.0/8"]))
    params = callback_params(new_sid(), "sent")
    body = urlencode(params).encode()
    headers = [(b"host", host), (b"content-type", FORM_TYPE), (b"user-agent", user_agent),
               (b"x-forwarded-for", b"198.51.100.4"),
               (b"x-twilio-signature", signed(signed_for, params)["X-Twilio-Signature"].encode())]
    scope = {"type": "http", "method": "POST", "path": "/twilio/status", "query_string": b"",
             "raw_path": b"/twilio/status", "headers": headers, "client": ("10.1.2.3", 5000)}
    sent: list[dict[str, Any]] = []
    events: list[Event] = []

    async def journal() -> None:
        async for submission in inbox:
            events.append(submission.event)
            submission.reply.answer(1)

    async def receive() -> Any:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    with trio.fail_after(5), structlog.testing.capture_logs() as logged:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(journal)
            await receiver(scope, receive, send)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    return sent[0]["status"], checker.urls, logged, events


async def test_one_hmac_per_genuine_callback_and_the_line_names_the_client() -> None:
    """A callback signed for the public URL costs one check; one signed with the Host
    header's spelling, a second. Each line names the client (behind the trusted proxy),
    the path and the user agent, cut to 200 characters; the event keeps the client."""
    agent = b"TwilioProxy/1.1" + b"x" * 300
    status, urls, [line], [event] = await receive_one(
        b"ledger.test", "https://ledger.test/twilio/status", agent)
    assert (status, urls) == (200, ["https://ledger.test/twilio/status"])
    assert (line["event"], line["client"], line["path"]) == (
        "callback_journaled", "198.51.100.4", "/twilio/status")
    assert line["user_agent"] == agent[:200].decode()
    assert event.data["client"] == "198.51.100.4"

    status, urls, _, [event] = await receive_one(
        b"Ledger.Test:443", "https://Ledger.Test/twilio/status", agent)
    assert (status, urls) == (200, ["https://ledger.test/twilio/status",
                                    "https://Ledger.Test/twilio/status"])
    assert event.data["url"] == "https://Ledger.Test/twilio/status"

    status, urls, [line], events = await receive_one(
        b"evil.test", "https://evil.test/twilio/status", b"curl")
    assert (status, urls, events) == (403, ["https://ledger.test/twilio/status"], [])
    assert (line["event"], line["client"], line["user_agent"]) == (
        "callback_refused", "198.51.100.4", "curl")
