"""The webhook receiver end to end: a real daemon, real HTTP, a real SQLite file."""

from __future__ import annotations

from urllib.parse import urlencode

import trio

from msgledger import store

from .conftest import (
    API_TOKEN,
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
