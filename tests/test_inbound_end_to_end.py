"""Inbound messages end to end: the simulator plays Twilio (signed inbound webhooks, media
behind Basic auth and a CDN redirect that refuses credentials, TwiML replies it sends and
reports on), the real daemon journals them, and the media fetcher keeps their files."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import trio

from msgledger import cli, store
from msgledger.sim import NewInbound, OutcomeWeights, SimKnobs, Simulator, serve_sim

from .conftest import (
    ACCOUNT_SID,
    API_TOKEN,
    AUTH_TOKEN,
    Ledger,
    daemon_environ,
    open_ledger,
    signed,
)
from .inbound_app import App, answering, never_answering, start_app

FIRM, CLIENT = "+15005550006", "+15558675310"
PNG = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(3000)
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}


@dataclasses.dataclass
class Scene:
    ledger: Ledger
    sim: Simulator
    app: App | None

    async def record(self, key: str) -> dict[str, Any]:
        response = await self.ledger.record(key)
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record

    async def record_when(self, key: str, done: Callable[[dict[str, Any]], bool]
                          ) -> dict[str, Any]:
        """The record once `done` says so; the caller's deadline bounds the wait."""
        while True:
            response = await self.ledger.record(key)
            if response.status_code == 200 and done(response.json()):
                return dict(response.json())
            await trio.sleep(0.05)


@asynccontextmanager
async def scene(tmp_path: Path, *, app_answer: bytes | None = None,
                **environ: str) -> AsyncIterator[Scene]:
    knobs = SimKnobs(ACCOUNT_SID, AUTH_TOKEN, step_delay=(0.001, 0.005), seed=11,
                     outcome_weights=OutcomeWeights(delivered=1, undelivered=0, failed=0))
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(partial(serve_sim, knobs))
        app = None if app_answer is None else await start_app(nursery, answering(body=app_answer))
        if app is not None:
            environ["MSGLEDGER_INBOUND_FORWARD_URL"] = app.url
        env = daemon_environ(tmp_path / "ledger.db", MSGLEDGER_TWILIO_ACCOUNT_SID=ACCOUNT_SID,
                             MSGLEDGER_TWILIO_API_BASE_URL=sim.base_url, **environ)
        async with open_ledger(env) as ledger:
            sim.knobs = dataclasses.replace(sim.knobs,
                                            inbound_url=ledger.public_url + "/twilio/inbound")
            yield Scene(ledger, sim, app)
        nursery.cancel_scope.cancel()


def archived(record: dict[str, Any]) -> bool:
    return bool(record["media"]) and all(m["state"] != "pending" for m in record["media"])


async def test_an_sms_and_an_mms_are_journaled_and_their_media_kept(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            sms = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "yes, sell"))
            # Answered 200 means journaled: the record is there at once.
            sms_record = await s.record(sms.sid)
            mms = await s.sim.receive_inbound(NewInbound(
                CLIENT, FIRM, "my ID", media=(("image/png", PNG), ("text/plain", b"hello"))))
            mms_record = await s.record_when(mms.sid, archived)
            served = await s.ledger.client.get(f"/v1/messages/{mms.sid}/media/0",
                                               headers=BEARER)
            stats = s.sim.stats
    assert (sms.answered_by, sms.primary_status) == ("primary", 200)
    assert (sms_record["direction"], sms_record["body"]) == ("inbound", "yes, sell")
    assert sms_record["media"] == []
    first, second = mms_record["media"]
    assert (first["state"], first["kept"], first["size"]) == ("archived", True, len(PNG))
    assert first["sha256"] == hashlib.sha256(PNG).hexdigest()
    assert first["content_type"] == "image/png" and second["content_type"] == "text/plain"
    assert served.status_code == 200 and served.content == PNG
    assert served.headers["content-type"] == "image/png"
    assert served.headers["x-media-sha256"] == first["sha256"]
    assert (stats.media_fetches, stats.cdn_downloads, stats.cdn_credentials_refused) == (2, 2, 0)


async def test_keep_media_hash_keeps_no_bytes_and_the_cap_truncates(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path, MSGLEDGER_STORE_KEEP_MEDIA="hash",
                         MSGLEDGER_STORE_MAX_MEDIA_BYTES="1000") as s:
            report = await s.sim.receive_inbound(NewInbound(
                CLIENT, FIRM, "", media=(("image/png", PNG), ("text/plain", b"small"))))
            record = await s.record_when(report.sid, archived)
            served = await s.ledger.client.get(f"/v1/messages/{report.sid}/media/1",
                                               headers=BEARER)
    big, small = record["media"]
    assert (big["state"], big["kept"]) == ("truncated", False)
    assert "media_truncated" in record["flags"]
    assert 1000 < big["size"] <= len(PNG)
    assert (small["state"], small["kept"], small["size"]) == ("archived", False, 5)
    assert small["sha256"] == hashlib.sha256(b"small").hexdigest()
    assert served.status_code == 404 and "not kept" in served.json()["error"]
    assert PNG[:64] not in (tmp_path / "ledger.db").read_bytes()


TWO_REPLIES = (b'<?xml version="1.0" encoding="UTF-8"?><Response>'
               b"<Message>Thanks, noted.</Message>"
               b"<Message><Body>A second line</Body></Message></Response>")


async def test_the_app_replies_end_in_the_record_with_sids_and_final_statuses(
        tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path, app_answer=TWO_REPLIES) as s:
            report = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "hello?"))
            replies = [await s.record_when(sid, lambda r: r["status"] == "delivered")
                       for sid in report.reply_sids]
            inbound = await s.record(report.sid)
    assert len(report.reply_sids) == 2 and report.answered_by == "primary"
    for reply, body in zip(replies, ("Thanks, noted.", "A second line"), strict=True):
        assert (reply["direction"], reply["in_reply_to"], reply["body"]) == (
            "outbound-reply", report.sid, body)
        assert reply["ref"].startswith("ml-") and reply["final"]
        assert (reply["to"], reply["from"]) == (CLIENT, FIRM)
        assert reply["history"][0]["kind"] == "send_requested"
    assert [h["kind"] for h in inbound["history"]] == ["inbound_received"]


async def test_the_fallback_url_is_the_same_record(tmp_path: Path) -> None:
    """The primary is down (nothing listens there): Twilio tries the fallback, msgledger."""
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            s.sim.knobs = dataclasses.replace(
                s.sim.knobs, inbound_url="http://127.0.0.1:9/down",
                inbound_fallback_url=s.ledger.public_url + "/twilio/inbound")
            report = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "via fallback"))
            record = await s.record(report.sid)
    assert report.answered_by == "fallback"
    assert "via_fallback" in record["flags"]
    params = dict(map(tuple, record["history"][0]["data"]["params"]))
    assert params["ErrorCode"] == "11200" and params["ErrorUrl"] == "http://127.0.0.1:9/down"


async def test_a_forged_media_url_is_never_fetched(tmp_path: Path) -> None:
    """A signed webhook (a misconfigured proxy, a leaked token) names media elsewhere than
    the message's own path at Twilio: journaled, refused, and no credentials go out. A
    genuine MMS after it, fetched, shows the fetcher ran meanwhile."""
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            sid, other = "MM" + secrets.token_hex(16), "MM" + secrets.token_hex(16)
            elsewhere = (f"{s.sim.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/"
                         f"{other}/Media/ME{secrets.token_hex(16)}")
            params = {"MessageSid": sid, "AccountSid": ACCOUNT_SID, "From": CLIENT,
                      "To": FIRM, "Body": "", "NumMedia": "2", "MediaUrl0": elsewhere,
                      "MediaUrl1": "http://attacker.example/collect"}
            url = s.ledger.public_url + "/twilio/inbound"
            response = await s.ledger.client.post("/twilio/inbound", content=urlencode(params),
                                                  headers=signed(url, params))
            genuine = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "x",
                                                             media=(("image/png", PNG),)))
            await s.record_when(genuine.sid, archived)
            record = await s.record(sid)
            fetched = s.sim.stats.media_fetches
    assert response.status_code == 200
    assert [m["state"] for m in record["media"]] == ["refused", "refused"]
    assert "media_url_refused" in record["flags"]
    assert fetched == 1  # the genuine file alone


async def test_a_file_twilio_does_not_have_fails_and_is_tried_again_later(
        tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            sid = "MM" + secrets.token_hex(16)
            gone = (f"{s.sim.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}"
                    f"/Media/ME{secrets.token_hex(16)}")
            params = {"MessageSid": sid, "AccountSid": ACCOUNT_SID, "From": CLIENT,
                      "To": FIRM, "Body": "", "NumMedia": "1", "MediaUrl0": gone}
            url = s.ledger.public_url + "/twilio/inbound"
            await s.ledger.client.post("/twilio/inbound", content=urlencode(params),
                                       headers=signed(url, params))
            record = await s.record_when(sid, lambda r: r["media"][0]["attempts"] == 1)
    [item] = record["media"]
    assert item["state"] == "pending" and "answered 404" in item["error"]
    failed = [h for h in record["history"] if h["kind"] == "media_failed"]
    assert failed[0]["data"]["retry_at"] > failed[0]["at"]


async def test_a_reply_to_our_message_links_to_it(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            sent = await s.ledger.client.post("/v1/messages", headers=BEARER, json={
                "to": CLIENT, "from": FIRM, "body": "Sell 100?"})
            ours = sent.json()["sid"]
            report = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "yes, sell",
                                                            replied_to=ours))
            record = await s.record(report.sid)
            listed = await s.ledger.client.get("/v1/messages", headers=BEARER)
    assert record["in_reply_to"] == ours
    assert {m["direction"] for m in listed.json()["messages"]} == {"outbound-api", "inbound"}


async def test_the_media_route_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            report = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "no media"))
            client = s.ledger.client
            answers = [await client.get(path, headers=headers) for path, headers in (
                (f"/v1/messages/{report.sid}/media/0", BEARER),
                (f"/v1/messages/{report.sid}/media/x", BEARER),
                (f"/v1/messages/{report.sid}/media/0", {}),
                ("/v1/messages/nope/media/0", BEARER))]
    assert [a.status_code for a in answers] == [404, 400, 401, 404]
    assert "has no media 0" in answers[0].json()["error"]


async def reconcile_today(s: Scene) -> dict[str, Any]:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    asked = await s.ledger.client.post("/v1/reconcile", headers=BEARER,
                                       json={"date": today, "source": "list"})
    assert asked.status_code == 202, asked.text
    while True:
        run = (await s.ledger.client.get(f"/v1/reconcile/runs/{asked.json()['run_id']}",
                                         headers=BEARER)).json()
        if run["status"] not in ("running", "waiting_for_export"):
            return dict(run)
        await trio.sleep(0.1)


async def test_a_daily_reconcile_imports_an_inbound_message_whose_webhook_was_lost(
        tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            received = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "got it"))
            lost = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "STOP",
                                                          deliver=False))
            run = await reconcile_today(s)
            imported = await s.record(lost.sid)
            kept = await s.record(received.sid)
            again = await reconcile_today(s)
    assert run["status"] == "done", run["reason"]
    assert run["counts"]["missed_webhook"] == 1 and run["counts"]["unchanged"] == 1
    assert set(imported["flags"]) == {"imported", "missed_webhook"}
    assert (imported["direction"], imported["status"], imported["body"]) == (
        "inbound", "received", "STOP")
    assert [h["kind"] for h in kept["history"]] == ["inbound_received"]  # nothing new
    assert again["counts"].get("imported", 0) == 0


OWN_ACTION = (b"<Response><Message action=\"https://app.example/status\">"
              b"We will call you</Message></Response>")


async def test_a_reply_reporting_to_the_app_gets_its_sid_from_the_reconciler(
        tmp_path: Path) -> None:
    """The app named its own action URL: the reply's statuses go there, not to msgledger,
    so the daily reconcile matches the listed outbound-reply to the journaled reply by to,
    from, time and body."""
    with trio.fail_after(30):
        async with scene(tmp_path, app_answer=OWN_ACTION) as s:
            report = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "call me"))
            [reply_sid] = report.reply_sids
            await s.sim.wait_idle()
            before = (await s.ledger.client.get("/v1/messages", headers=BEARER)).json()
            run = await reconcile_today(s)
            after = await s.record(reply_sid)
    [waiting] = [m for m in before["messages"] if m["direction"] == "outbound-reply"]
    assert (waiting["sid"], waiting["status"]) == (None, "requested")
    assert run["counts"]["sid_matched"] == 1, run["counts"]
    assert (after["ref"], after["direction"], after["in_reply_to"]) == (
        waiting["ref"], "outbound-reply", report.sid)
    assert after["status"] == "delivered" and after["flags"] == []


async def test_outbound_media_is_kept_from_twilios_copy(tmp_path: Path) -> None:
    """A send with media_url: Twilio fetches the files; msgledger keeps its own copy of
    Twilio's, found through the message's Media list once the SID is known."""
    urls = ["https://files.example/statement.pdf", "https://files.example/chart.png"]
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            sent = await s.ledger.client.post("/v1/messages", headers=BEARER, json={
                "to": CLIENT, "from": FIRM, "media_url": urls})
            sid = sent.json()["sid"]
            record = await s.record_when(sid, archived)
            served = await s.ledger.client.get(f"/v1/messages/{sid}/media/1", headers=BEARER)
            twilio_copy = s.sim.messages[sid].media[1]
    assert sent.status_code == 201 and sid.startswith("MM")
    assert [(m["n"], m["state"], m["kept"]) for m in record["media"]] == [
        (0, "archived", True), (1, "archived", True)]
    assert [m["url"] for m in record["media"]] == urls  # as sent; the copy is Twilio's:
    copies = [h["data"]["url"] for h in record["history"] if h["kind"] == "media_archived"]
    assert all(url.startswith(f"{s.sim.base_url}/2010-04-01/Accounts/") for url in copies)
    assert record["history"][0]["data"]["media_url"] == urls
    assert served.content == twilio_copy.data
    assert served.headers["content-type"] == twilio_copy.content_type


async def test_outbound_media_is_not_fetched_with_keep_media_none(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path, MSGLEDGER_STORE_KEEP_MEDIA="none") as s:
            sent = await s.ledger.client.post("/v1/messages", headers=BEARER, json={
                "to": CLIENT, "from": FIRM, "media_url": ["https://files.example/a.png"]})
            record = await s.record(sent.json()["sid"])
    assert [m["state"] for m in record["media"]] == ["unfetched"]
    assert s.sim.stats.media_fetches == 0


async def test_bad_media_urls_are_refused_before_anything_is_sent(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path) as s:
            answers = [await s.ledger.client.post("/v1/messages", headers=BEARER, json={
                "to": CLIENT, "from": FIRM, "media_url": urls}) for urls in (
                    [], ["ftp://x"], "https://one.example/a.png", ["https://a b"],
                    ["https://x/" + "a" * 2048], [f"https://x/{n}" for n in range(11)])]
            created = s.sim.stats.messages_created
    assert {a.status_code for a in answers} == {400}
    assert all(a.json()["field"] == "media_url" for a in answers)
    assert created == 0


async def test_an_app_that_times_out_leaves_twilio_an_empty_response_in_time(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        app = await start_app(nursery, never_answering)
        with trio.fail_after(30):
            async with scene(tmp_path, MSGLEDGER_INBOUND_FORWARD_URL=app.url,
                             MSGLEDGER_INBOUND_FORWARD_TIMEOUT="500ms") as s:
                started = trio.current_time()
                report = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "anyone?"))
                took = trio.current_time() - started
                record = await s.record(report.sid)
        nursery.cancel_scope.cancel()
    assert (report.answered_by, report.primary_status, report.reply_sids) == ("primary", 200,
                                                                               ())
    assert report.twiml is not None and "<Response/>" in report.twiml
    assert 0.5 <= took < 5
    assert [h["kind"] for h in record["history"]] == ["inbound_received",
                                                      "inbound_forward_failed"]


async def test_verify_and_export_cover_both_sides(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(30):
        async with scene(tmp_path, app_answer=TWO_REPLIES) as s:
            report = await s.sim.receive_inbound(NewInbound(CLIENT, FIRM, "pic",
                                                            media=(("image/png", PNG),)))
            await s.record_when(report.sid, archived)
            for sid in report.reply_sids:
                await s.record_when(sid, lambda r: r["final"])
    result = store.verify(str(tmp_path / "ledger.db"))
    assert result.ok, result.reason
    monkeypatch.setenv("MSGLEDGER_STORE_PATH", str(tmp_path / "ledger.db"))
    out = tmp_path / "export.jsonl"
    assert cli.main(["export", "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_direction = sorted(line["direction"] for line in lines)
    assert by_direction == ["inbound", "outbound-reply", "outbound-reply"]
    [inbound] = [line for line in lines if line["direction"] == "inbound"]
    assert inbound["media"][0]["sha256"] == hashlib.sha256(PNG).hexdigest()
    assert {h["kind"] for h in inbound["history"]} == {"inbound_received", "media_archived"}
