"""`POST /twilio/inbound` end to end: a real daemon, real HTTP, a real SQLite file, and,
behind `inbound.forward_url`, a real app server (`inbound_app.py`)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import trio
from twilio.request_validator import RequestValidator

from msgledger import store

from .conftest import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    FORM,
    Ledger,
    daemon_environ,
    new_sid,
    open_ledger,
    signed,
)
from .inbound_app import AppRequest, answering, never_answering, start_app

EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
FIRM = "+15005550006"  # our Twilio number
CLIENT = "+15558675310"  # who writes to it


def inbound_params(sid: str, body: str = "yes, sell", **extra: str) -> dict[str, str]:
    """The form Twilio posts when a message reaches our number (docs/inbound.md)."""
    return {"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": ACCOUNT_SID,
            "From": CLIENT, "To": FIRM, "Body": body, "NumMedia": "0", "NumSegments": "1",
            "SmsStatus": "received", "ApiVersion": "2010-04-01", "FromCountry": "US", **extra}


def media_url(sid: str, base: str = "https://api.twilio.com") -> str:
    return (f"{base}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}/Media/"
            f"ME{secrets.token_hex(16)}")


async def post_inbound(ledger: Ledger, params: Mapping[str, str],
                       token: str = AUTH_TOKEN) -> httpx.Response:
    headers = signed(ledger.public_url + "/twilio/inbound", params, token)
    return await ledger.client.post("/twilio/inbound", content=urlencode(params),
                                    headers=headers)


def journal_kinds(ledger: Ledger) -> list[str]:
    conn = store.connect(str(ledger.store_path), readonly=True)
    try:
        return [kind for (kind,) in conn.execute("SELECT kind FROM journal ORDER BY seq")]
    finally:
        conn.close()


@asynccontextmanager
async def ledger_with(tmp_path: Path, **environ: str) -> AsyncIterator[Ledger]:
    async with open_ledger(daemon_environ(tmp_path / "ledger.db", **environ)) as ledger:
        yield ledger


async def test_an_inbound_sms_is_journaled_then_answered_with_empty_twiml(
        ledger: Ledger) -> None:
    sid = new_sid()
    response = await post_inbound(ledger, inbound_params(sid, NewParam="kept"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert response.content == EMPTY
    record = (await ledger.record(sid)).json()
    assert (record["direction"], record["status"], record["final"]) == ("inbound", "received",
                                                                        True)
    assert (record["from"], record["to"], record["body"]) == (CLIENT, FIRM, "yes, sell")
    assert record["body_sha256"] == hashlib.sha256(b"yes, sell").hexdigest()
    assert record["received_at"] is not None and record["media"] == []
    [entry] = record["history"]
    assert (entry["kind"], entry["source"], entry["status"]) == ("inbound_received", "inbound",
                                                                 "received")
    assert ["NewParam", "kept"] in entry["data"]["params"]  # no whitelist: all of it


async def test_a_duplicate_is_journaled_and_changes_nothing(ledger: Ledger) -> None:
    """The same MessageSid again, from the fallback this time: the same answer, one more
    event, and the record as it was."""
    sid = new_sid()
    assert (await post_inbound(ledger, inbound_params(sid))).status_code == 200
    before = (await ledger.record(sid)).json()
    again = inbound_params(sid, body="changed", ErrorCode="11200",
                           ErrorUrl="https://ledger.example.com/twilio/inbound")
    response = await post_inbound(ledger, again)
    assert (response.status_code, response.content) == (200, EMPTY)
    after = (await ledger.record(sid)).json()
    assert len(after["history"]) == 2
    assert {k: v for k, v in after.items() if k != "history"} == {
        k: v for k, v in before.items() if k != "history"}
    assert ["ErrorCode", "11200"] in after["history"][1]["data"]["params"]


async def test_the_fallback_is_kept_and_flagged(ledger: Ledger) -> None:
    """First received on the fallback URL: ErrorCode and ErrorUrl are kept, the record
    says so, and the fallback's error code is not taken for the message's."""
    sid = new_sid()
    params = inbound_params(sid, ErrorCode="11205", ErrorUrl="https://down.example.com/sms")
    assert (await post_inbound(ledger, params)).status_code == 200
    record = (await ledger.record(sid)).json()
    assert "via_fallback" in record["flags"] and record["error_code"] is None
    pairs = record["history"][0]["data"]["params"]
    assert ["ErrorUrl", "https://down.example.com/sms"] in pairs


async def test_a_reply_links_to_the_message_it_answers(ledger: Ledger) -> None:
    ours = new_sid()
    sid = new_sid()
    params = inbound_params(sid, OriginalRepliedMessageSid=ours,
                            OriginalRepliedMessageSender=FIRM)
    assert (await post_inbound(ledger, params)).status_code == 200
    assert (await ledger.record(sid)).json()["in_reply_to"] == ours


async def test_bad_requests_are_refused_and_journal_nothing(ledger: Ledger) -> None:
    sid = new_sid()
    forged = await post_inbound(ledger, inbound_params(sid), token="not-the-token")
    no_sid = await post_inbound(ledger, {k: v for k, v in inbound_params(sid).items()
                                         if k != "MessageSid"})
    query = urlencode(inbound_params(sid))
    get = await ledger.client.get(
        f"/twilio/inbound?{query}",
        headers=signed(f"{ledger.public_url}/twilio/inbound?{query}", {}))
    assert (forged.status_code, no_sid.status_code, get.status_code) == (403, 400, 405)
    assert get.headers["allow"] == "POST"
    assert "MessageSid" in no_sid.json()["error"]
    assert journal_kinds(ledger) == []


async def test_media_that_cannot_be_trusted_is_journaled_and_flagged(ledger: Ledger) -> None:
    """A count that disagrees with the URLs, or a URL that is not the message's own at
    Twilio: kept verbatim, never to be fetched, and said so on the record."""
    miscounted, foreign = new_sid(), new_sid()
    own = media_url(miscounted)
    await post_inbound(ledger, inbound_params(miscounted, NumMedia="2", MediaUrl0=own,
                                              MediaContentType0="image/jpeg"))
    await post_inbound(ledger, inbound_params(
        foreign, NumMedia="2", MediaUrl0=media_url(foreign),
        MediaUrl1="https://attacker.example/steal", MediaContentType1="image/png"))
    first = (await ledger.record(miscounted)).json()
    second = (await ledger.record(foreign)).json()
    assert "media_mismatch" in first["flags"]
    assert [(m["n"], m["url"], m["state"]) for m in first["media"]] == [(0, own, "refused")]
    assert "media_url_refused" in second["flags"]
    assert [m["state"] for m in second["media"]] == ["pending", "refused"]
    assert second["media"][1]["content_type"] == "image/png"


@pytest.mark.parametrize("url", [
    "https://api.twilio.com/2010-04-01/Accounts/{account}/Messages/{other}/Media/ME{hex}",
    "https://api.twilio.com.attacker.example/2010-04-01/Accounts/{account}/Messages/{sid}/Media/ME{hex}",
    "http://api.twilio.com/2010-04-01/Accounts/{account}/Messages/{sid}/Media/ME{hex}",
    "https://api.twilio.com/2010-04-01/Accounts/{account}/Messages/{sid}/Media/ME{hex}?x=1",
    "https://user:pw@api.twilio.com/2010-04-01/Accounts/{account}/Messages/{sid}/Media/ME{hex}",
    "https://api.twilio.com/2010-04-01/Accounts/{account}/Messages/{sid}/Media/../../x",
    "https://[::1/2010-04-01/Accounts/{account}/Messages/{sid}/Media/ME{hex}",  # not a URL
    "https://api.twilio.com:99999/2010-04-01/Accounts/{account}/Messages/{sid}/Media/ME{hex}",
])
async def test_media_urls_off_the_message_path_are_refused(tmp_path: Path, url: str) -> None:
    sid = new_sid()
    spelled = url.format(account=ACCOUNT_SID, sid=sid, other=new_sid(), hex="a" * 32)
    async with ledger_with(tmp_path) as ledger:
        await post_inbound(ledger, inbound_params(sid, NumMedia="1", MediaUrl0=spelled))
        record = (await ledger.record(sid)).json()
    assert [m["state"] for m in record["media"]] == ["refused"]
    assert "media_url_refused" in record["flags"]


async def test_keep_body_hash_keeps_no_body(tmp_path: Path) -> None:
    sid = new_sid()
    async with ledger_with(tmp_path, MSGLEDGER_STORE_KEEP_BODY="hash") as ledger:
        assert (await post_inbound(ledger, inbound_params(sid, body="secret"))).status_code == 200
        record = (await ledger.record(sid)).json()
    assert record["body"] is None
    assert record["body_sha256"] == hashlib.sha256(b"secret").hexdigest()
    data = record["history"][0]["data"]
    assert data["body_length"] == 6
    assert not any(name == "Body" for name, _ in data["params"])
    assert b"secret" not in (tmp_path / "ledger.db").read_bytes()


TWO_REPLIES = b"""<?xml version="1.0" encoding="UTF-8"?>
<Response>
  <Message method="GET">Order received.</Message>
  <Message to="+15558670000" action="https://app.example/status"><Body>Desk: a client wrote</Body></Message>
</Response>"""  # noqa: E501


async def test_the_app_answer_goes_to_twilio_and_its_replies_to_the_record(
        tmp_path: Path) -> None:
    """The app gets the message signed for its own URL; its two <Message> replies are
    journaled as outbound-reply sends linked to the inbound message, and the one without a
    URL of its own is told to report to msgledger."""
    sid = new_sid()
    async with trio.open_nursery() as nursery:
        app = await start_app(nursery, answering(body=TWO_REPLIES))
        async with ledger_with(tmp_path, MSGLEDGER_INBOUND_FORWARD_URL=app.url) as ledger:
            response = await post_inbound(ledger, inbound_params(sid, Extra="x"))
            kinds = journal_kinds(ledger)
            replies = [(await ledger.record(ref)).json() for ref in _action_refs(response)]
            second = _reply_by_body(ledger, "Desk: a client wrote")
        nursery.cancel_scope.cancel()
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/")
    assert b'action="https://app.example/status"' in response.content
    assert response.content.count(b'method="POST"') == 1  # ours: /twilio/status takes POST
    [forwarded] = app.requests
    assert ("Extra", "x") in forwarded.form
    assert RequestValidator(AUTH_TOKEN).validate(
        app.url, dict(forwarded.form), forwarded.headers["x-twilio-signature"])
    assert kinds == ["inbound_received", "send_requested", "send_requested"]
    [first] = replies
    assert (first["direction"], first["in_reply_to"], first["status"]) == (
        "outbound-reply", sid, "requested")
    assert (first["to"], first["from"], first["body"]) == (CLIENT, FIRM, "Order received.")
    assert second == ("+15558670000", FIRM, sid)


def _action_refs(response: httpx.Response) -> list[str]:
    """The refs of msgledger's own status URLs in a TwiML answer."""
    refs = []
    for part in response.text.split('action="')[1:]:
        url = part.split('"', 1)[0].replace("&amp;", "&")
        if "/twilio/status" in url:
            refs += parse_qs(urlsplit(url).query)["ref"]
    return refs


def _reply_by_body(ledger: Ledger, body: str) -> tuple[Any, ...]:
    conn = store.connect(str(ledger.store_path), readonly=True)
    try:
        return tuple(conn.execute(
            "SELECT to_number, from_number, in_reply_to FROM messages WHERE body = ?",
            (body,)).fetchone())
    finally:
        conn.close()


BAD_ANSWERS = {
    "entities": (200, b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]>'
                      b"<Response><Message>&a;</Message></Response>", "DOCTYPE or entities"),
    "not xml": (200, b"OK", "not XML"),
    "not twiml": (200, b"<html><body>hi</body></html>", "not a TwiML <Response>"),
    "too large": (200, b"<Response>" + b" " * 70_000 + b"</Response>", "over 65536 bytes"),
    "an error": (500, b"<Response/>", "the app answered 500"),
}


@pytest.mark.parametrize("case", BAD_ANSWERS)
async def test_an_unusable_app_answer_gives_an_empty_response(tmp_path: Path,
                                                               case: str) -> None:
    status, body, reason = BAD_ANSWERS[case]
    sid = new_sid()
    async with trio.open_nursery() as nursery:
        app = await start_app(nursery, answering(status, body))
        async with ledger_with(tmp_path, MSGLEDGER_INBOUND_FORWARD_URL=app.url) as ledger:
            response = await post_inbound(ledger, inbound_params(sid))
            record = (await ledger.record(sid)).json()
        nursery.cancel_scope.cancel()
    assert (response.status_code, response.content) == (200, EMPTY)
    assert [h["kind"] for h in record["history"]] == ["inbound_received",
                                                      "inbound_forward_failed"]
    assert reason in record["history"][1]["data"]["reason"]


async def test_an_app_that_times_out_gives_an_empty_response_within_the_bound(
        tmp_path: Path) -> None:
    sid = new_sid()
    async with trio.open_nursery() as nursery:
        app = await start_app(nursery, never_answering)
        async with ledger_with(tmp_path, MSGLEDGER_INBOUND_FORWARD_URL=app.url,
                               MSGLEDGER_INBOUND_FORWARD_TIMEOUT="300ms") as ledger:
            started = trio.current_time()
            response = await post_inbound(ledger, inbound_params(sid))
            took = trio.current_time() - started
            record = (await ledger.record(sid)).json()
        nursery.cancel_scope.cancel()
    assert (response.status_code, response.content) == (200, EMPTY)
    assert 0.3 <= took < 5
    assert record["history"][1]["data"]["reason"] == "no answer within 0.3s"
    assert isinstance(app.requests[0], AppRequest)


async def test_an_app_that_answers_nothing_gets_nothing_sent(tmp_path: Path) -> None:
    sid = new_sid()
    async with trio.open_nursery() as nursery:
        app = await start_app(nursery, answering(204))
        async with ledger_with(tmp_path, MSGLEDGER_INBOUND_FORWARD_URL=app.url) as ledger:
            response = await post_inbound(ledger, inbound_params(sid))
            kinds = journal_kinds(ledger)
        nursery.cancel_scope.cancel()
    assert (response.status_code, response.content, kinds) == (200, EMPTY,
                                                               ["inbound_received"])


async def test_inbound_is_refused_with_the_other_webhooks_off(tmp_path: Path) -> None:
    async with ledger_with(tmp_path, MSGLEDGER_HTTP_WEBHOOKS="false") as ledger:
        response = await ledger.client.post("/twilio/inbound", headers=FORM,
                                            content=urlencode(inbound_params(new_sid())))
    assert response.status_code == 404
