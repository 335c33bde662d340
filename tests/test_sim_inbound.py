"""The simulator's inbound side over real HTTP: texts from customers posted, signed, to a
small hypercorn app standing in for msgledger's /twilio/inbound, its fallback, the replies its
TwiML asks for, and the media behind Basic auth and a CDN link.

The app checks every signature with `RequestValidator`, against the URL it was reached at.
Timers (the webhook's 15 s, a CDN link's 4 h) run on Trio's virtual clock: no real sleeps.
The real `twilio` client (blocking, so in worker threads) reads Media.json.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import trio
from twilio.request_validator import RequestValidator

from msgledger.http.server import answer_lifespan
from msgledger.sim import (
    InboundReport,
    NewInbound,
    SimKnobs,
    SimMedia,
    Simulator,
    open_simulator,
)
from msgledger.sim._app import handle_api
from msgledger.sim._http import Request

from .fake_twilio import read_body, serve_on_loopback
from .test_sim import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BASIC_AUTH,
    FROM,
    KNOBS,
    SERVICE_SID,
    call,
    client_for,
    recorder,
    start_sim,
)

CUSTOMER = "+15558675310"  # who texts us
OUR_NUMBER = FROM  # the number they text
EMPTY = "<Response/>"
AUTH = (ACCOUNT_SID, AUTH_TOKEN)
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  '<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><Response><Message>&lol2;</Message>'
                  "</Response>")
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Hit:
    """One request the app received."""

    path: str
    url: str
    params: dict[str, str]
    headers: dict[str, str]
    signature_valid: bool


@dataclass
class Answer:
    status: int = 200
    body: str = EMPTY
    hang: bool = False  # never answer


@dataclass
class App:
    """msgledger's stand-in: answers each path as `answers` says (/inbound and /fallback an
    empty <Response/> at first; any other path 200 and no body: a status callback), and
    records every request."""

    base_url: str = ""
    answers: dict[str, Answer] = field(
        default_factory=lambda: {"/inbound": Answer(), "/fallback": Answer()})
    hits: list[Hit] = field(default_factory=list)

    def at(self, path: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.path == path]

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        self._record(scope, body)
        answer = self.answers.get(scope["path"], Answer(200, ""))
        if answer.hang:
            await trio.sleep_forever()
        headers = [(b"content-type", b"text/xml")]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body.encode()})

    def _record(self, scope: dict[str, Any], body: bytes) -> None:
        query = scope["query_string"].decode()
        url = self.base_url + scope["raw_path"].decode() + (f"?{query}" if query else "")
        params = dict(parse_qsl(body.decode()))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        valid = RequestValidator(AUTH_TOKEN).validate(url, params,
                                                       headers.get("x-twilio-signature", ""))
        self.hits.append(Hit(scope["path"], url, params, headers, bool(valid)))


@pytest.fixture
async def app(nursery: trio.Nursery) -> App:
    """The app on 127.0.0.1, stopped with the test."""
    it = App()
    it.base_url = await serve_on_loopback(nursery, it)
    return it


async def sim_for(nursery: trio.Nursery, app: App, *, fallback: bool = True,
                  **knobs: Any) -> Simulator:
    """A simulator whose number posts to the app's /inbound (and /fallback)."""
    urls = {"inbound_url": app.base_url + "/inbound?number=1",
            "inbound_fallback_url": app.base_url + "/fallback" if fallback else None}
    return await start_sim(nursery, **{**urls, **knobs})


def text(body: str = "hello", **fields: Any) -> NewInbound:
    return NewInbound(CUSTOMER, OUR_NUMBER, body, **fields)


def picture(n: int) -> tuple[str, bytes]:
    return ("image/png", b"\x89PNG fake " + bytes([n]))


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), UTC)


async def closed_port() -> int:
    with trio.socket.socket() as placeholder:
        await placeholder.bind(("127.0.0.1", 0))
        port: int = placeholder.getsockname()[1]  # nothing listens there once it is closed
    return port


async def test_the_webhook_is_signed_and_carries_twilios_parameters(
    nursery: trio.Nursery, app: App
) -> None:
    """A text with two pictures, to a service's number, replying to our message, is posted
    once to inbound_url, validly signed (query string included), with Twilio's parameters;
    it is stored as inbound and received."""
    sim = await sim_for(nursery, app)
    ours = sim.add_message(to=CUSTOMER, from_=OUR_NUMBER)
    inbound = text(media=(picture(1), ("image/jpeg", b"\xff\xd8 jpeg")),
                   messaging_service_sid=SERVICE_SID, replied_to=ours.sid,
                   extra={"FromCountry": "US"})
    with trio.fail_after(10):
        report = await sim.receive_inbound(inbound)
    [hit] = app.hits
    params, sid = hit.params, report.sid
    assert report == InboundReport(sid, "primary", 200, None, EMPTY, (), ())
    assert hit.signature_valid and hit.url == app.base_url + "/inbound?number=1"
    assert sid.startswith("MM") and len(sid) == 34
    assert params["SmsSid"] == params["SmsMessageSid"] == params["MessageSid"] == sid
    media = sim.messages[sid].media
    base = f"{sim.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}/Media/"
    assert params == {
        "MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": ACCOUNT_SID,
        "MessagingServiceSid": SERVICE_SID, "From": CUSTOMER, "To": OUR_NUMBER,
        "Body": "hello", "NumMedia": "2", "NumSegments": "1", "SmsStatus": "received",
        "ApiVersion": "2010-04-01", "MediaUrl0": base + media[0].sid,
        "MediaContentType0": "image/png", "MediaUrl1": base + media[1].sid,
        "MediaContentType1": "image/jpeg", "OriginalRepliedMessageSid": ours.sid,
        "OriginalRepliedMessageSender": OUR_NUMBER, "FromCountry": "US"}
    assert all(m.sid.startswith("ME") and len(m.sid) == 34 for m in media)
    assert hit.headers["content-type"] == "application/x-www-form-urlencoded"
    assert hit.headers["i-twilio-idempotency-token"]
    stored = sim.messages[sid]
    assert (stored.direction, stored.status, stored.date_sent) == (
        "inbound", "received", stored.date_created)
    assert (sim.stats.inbound_sent, sim.stats.inbound_fallbacks) == (1, 0)


async def test_media_is_fetched_by_a_307_and_the_cdn_refuses_credentials(
    nursery: trio.Nursery, app: App
) -> None:
    """A MediaUrl with Basic auth answers 307 to a CDN link, which serves the file to a
    request without credentials and 403 to one with them (as a client that follows the
    redirect with its auth on does); no auth, another ME or message is refused."""
    sim = await sim_for(nursery, app)
    with trio.fail_after(10):
        report = await sim.receive_inbound(text(media=(picture(7),)))
        url = app.hits[0].params["MediaUrl0"]
        async with httpx.AsyncClient() as client:
            redirect = await client.get(url, auth=AUTH)
            cdn_url = redirect.headers["location"]
            plain = await client.get(cdn_url)
            with_auth = await client.get(cdn_url, auth=AUTH)
            followed = await client.get(url, auth=AUTH, follow_redirects=True)
            anonymous = await client.get(url)
            other_media = await client.get(url[:-32] + "0" * 32, auth=AUTH)
            other_message = await client.get(url.replace(report.sid, "MM" + "0" * 32), auth=AUTH)
    assert redirect.status_code == 307 and cdn_url.startswith(sim.base_url + "/cdn/")
    assert plain.status_code == 200 and plain.content == picture(7)[1]
    assert plain.headers["content-type"] == "image/png"
    assert with_auth.status_code == followed.status_code == 403
    assert "Authorization" in with_auth.json()["message"]
    assert anonymous.status_code == 401 and anonymous.json()["code"] == 20003
    assert other_media.status_code == other_message.status_code == 404
    assert other_media.json()["code"] == other_message.json()["code"] == 20404
    stats = sim.stats
    assert (stats.media_fetches, stats.cdn_downloads, stats.cdn_credentials_refused) == (2, 1, 2)


@pytest.mark.deadline(86_400)  # virtual seconds: a CDN link's 4 hours pass
async def test_a_cdn_link_serves_for_four_hours(autojump_clock: trio.abc.Clock) -> None:
    """On virtual time a CDN link serves its file, again and again, until 4 h are up."""
    async with open_simulator(KNOBS, base_url="http://sim", deliver=recorder([])) as sim:
        message = sim.store_inbound(text(media=(picture(1),)))
        path = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message.sid}/Media/"
        redirect = await handle_api(sim, Request("GET", path + message.media[0].sid,
                                                 {"authorization": BASIC_AUTH}, b""))
        link = dict(redirect.headers)["Location"].removeprefix("http://sim")
        served = [await handle_api(sim, Request("GET", link, {}, b""))]
        await trio.sleep(4 * 3600 - 0.1)
        served.append(await handle_api(sim, Request("GET", link, {}, b"")))
        await trio.sleep(0.1)
        expired = await handle_api(sim, Request("GET", link, {}, b""))
    assert redirect.status == 307
    assert [r.status for r in served] == [200, 200] and served[0].body == picture(1)[1]
    assert expired.status == 403 and json.loads(expired.body)["status"] == 403


@pytest.mark.parametrize("failure", ["500", "refused"])
async def test_a_failing_webhook_falls_back_with_error_code_and_url(
    nursery: trio.Nursery, app: App, failure: str
) -> None:
    """A primary answering 500, or refusing the connection, is followed at once by the
    fallback: the same parameters plus ErrorCode 11200 and ErrorUrl, signed for the fallback
    URL; its TwiML is the one obeyed."""
    primary = app.base_url + "/inbound?number=1"
    if failure == "refused":
        primary = f"http://127.0.0.1:{await closed_port()}/inbound?number=1"
    sim = await sim_for(nursery, app, inbound_url=primary)
    app.answers["/inbound"] = Answer(500, "<Response><Message>never</Message></Response>")
    app.answers["/fallback"] = Answer(200, "<Response><Message>sorry</Message></Response>")
    with trio.fail_after(10):
        report = await sim.receive_inbound(text())
        await sim.wait_idle()
    [fallback] = app.at("/fallback")
    primary_params = app.at("/inbound")[0].params if failure == "500" else None
    assert fallback.signature_valid and fallback.url == app.base_url + "/fallback"
    assert fallback.params["ErrorCode"] == "11200" and fallback.params["ErrorUrl"] == primary
    if primary_params is not None:
        assert fallback.params == {**primary_params, "ErrorCode": "11200", "ErrorUrl": primary}
    assert report.answered_by == "fallback" and report.fallback_status == 200
    assert report.primary_status == (500 if failure == "500" else None)
    assert report.errors[0].startswith("primary: ")
    assert "ConnectError" in report.errors[0] if failure == "refused" else "500" in report.errors[0]
    [reply] = report.reply_sids
    assert sim.messages[reply].body == "sorry"
    assert (sim.stats.inbound_sent, sim.stats.inbound_fallbacks) == (1, 1)


async def test_a_webhook_that_never_answers_falls_back_after_15_s(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, app: App
) -> None:
    """On virtual time, a primary that holds the request is given up after inbound_timeout
    (15 s), and the fallback gets ErrorCode 11205."""
    sim = await sim_for(nursery, app)
    app.answers["/inbound"] = Answer(hang=True)
    started = trio.current_time()
    report = await sim.receive_inbound(text())
    took = trio.current_time() - started
    [fallback] = app.at("/fallback")
    assert 15 <= took < 16
    assert fallback.signature_valid and fallback.params["ErrorCode"] == "11205"
    assert fallback.params["ErrorUrl"] == app.base_url + "/inbound?number=1"
    assert (report.answered_by, report.primary_status, report.fallback_status) == (
        "fallback", None, 200)
    assert report.errors == ("primary: no answer within 15 s",)


async def test_message_verbs_make_outbound_replies_called_back_at_their_urls(
    nursery: trio.Nursery, app: App
) -> None:
    """Two <Message> verbs make two outbound-reply messages: the first to the sender from
    our number, called back at its action URL; the second with its own to, from, <Body>,
    <Media>, called back at statusCallback (over action). Verbs that cannot be sent are
    skipped and said so."""
    sim = await sim_for(nursery, app)
    app.answers["/inbound"] = Answer(body=(
        "<Response>"
        f'<Message action="{app.base_url}/action1">Thanks!</Message>'
        f'<Message to="+15550001111" from="+15005550007" action="{app.base_url}/unused"'
        f' statusCallback="{app.base_url}/status2"><Body>Second</Body>'
        "<Media>https://example.com/pic.png</Media></Message>"
        '<Message to="nobody">x</Message><Redirect>https://example.com/next</Redirect>'
        "</Response>"))
    with trio.fail_after(10):
        report = await sim.receive_inbound(text())
        await sim.wait_idle()
    first, second = (sim.messages[sid] for sid in report.reply_sids)
    assert (first.direction, first.to, first.from_, first.body) == (
        "outbound-reply", CUSTOMER, OUR_NUMBER, "Thanks!")
    assert (second.direction, second.to, second.from_, second.body) == (
        "outbound-reply", "+15550001111", "+15005550007", "Second")
    assert first.sid.startswith("SM") and second.sid.startswith("MM")
    assert [m.content_type for m in second.media] == ["image/png"]
    assert first.status == second.status == "delivered"
    for path, reply in (("/action1", first), ("/status2", second)):
        calls = app.at(path)
        assert [c.params["MessageStatus"] for c in calls] == ["sent", "delivered"]
        assert all(c.params["MessageSid"] == reply.sid and c.signature_valid for c in calls)
    assert app.at("/unused") == []
    assert len(report.errors) == 2
    assert "21211" in report.errors[0] and "<Redirect>" in report.errors[1]
    assert (sim.stats.replies_created, sim.stats.messages_created) == (2, 0)


@pytest.mark.parametrize("document", [BILLION_LAUGHS, "<html>OK</html>", "OK", ""],
                         ids=["doctype", "html", "plain", "empty"])
async def test_an_answer_that_is_not_twiml_fails_with_12100(
    nursery: trio.Nursery, app: App, document: str
) -> None:
    """A DOCTYPE (entities and all), another root, plain text or nothing is no TwiML: no
    reply is sent and the fallback gets ErrorCode 12100."""
    sim = await sim_for(nursery, app)
    app.answers["/inbound"] = Answer(200, document)
    with trio.fail_after(10):
        report = await sim.receive_inbound(text())
    [fallback] = app.at("/fallback")
    assert fallback.params["ErrorCode"] == "12100"
    assert report.answered_by == "fallback" and report.twiml == EMPTY
    assert report.primary_status == 200 and report.reply_sids == ()
    assert report.errors[0].startswith("primary: not TwiML")
    if document == BILLION_LAUGHS:
        assert "DTDForbidden" in report.errors[0]
    assert [m.direction for m in sim.messages.values()] == ["inbound"]


async def test_with_both_urls_failing_nothing_answers(nursery: trio.Nursery, app: App) -> None:
    """A failing primary and no fallback URL: answered by nobody, no reply, and why."""
    sim = await sim_for(nursery, app, fallback=False)
    app.answers["/inbound"] = Answer(503, "")
    with trio.fail_after(10):
        report = await sim.receive_inbound(text())
    assert report == InboundReport(report.sid, None, 503, None, None, (), (
        "primary: answered HTTP 503", "no inbound_fallback_url to fall back on"))
    assert sim.stats.inbound_fallbacks == 0


async def test_a_lost_webhook_still_lists_and_redaction_hides_the_sender(
    nursery: trio.Nursery, app: App
) -> None:
    """deliver=False stores the text with no webhook, with or without inbound_url; the list
    (real client) shows inbound, outbound-reply and outbound-api directions, and redaction
    hides the customer's number: `from` of a received text, `to` of the others."""
    sim = await sim_for(nursery, app, inbound_url=None, redact_to=True)
    lost = await sim.receive_inbound(text("lost", deliver=False))
    with pytest.raises(ValueError, match="inbound_url"):
        await sim.receive_inbound(text("nowhere"))
    sim.knobs = replace(sim.knobs, inbound_url=app.base_url + "/inbound")
    app.answers["/inbound"] = Answer(body="<Response><Message>hi back</Message></Response>")
    sent = sim.add_message(to=CUSTOMER)
    with trio.fail_after(10):
        answered = await sim.receive_inbound(text("answered"))
        await sim.wait_idle()
        listed = await call(client_for(sim).messages.list)
    assert lost == InboundReport(lost.sid, None, None, None, None, (), ())
    assert len(app.at("/inbound")) == 1 and sim.stats.inbound_sent == 1
    by_sid = {m.sid: m for m in listed}
    assert len(by_sid) == 4
    assert {sid: m.direction for sid, m in by_sid.items()} == {
        lost.sid: "inbound", answered.sid: "inbound", sent.sid: "outbound-api",
        answered.reply_sids[0]: "outbound-reply"}
    received = by_sid[lost.sid]
    assert (received.status, received.from_, received.to) == ("received", "+1555867XXXX",
                                                             OUR_NUMBER)
    assert received.num_media == "0" and received.body == "lost"
    assert by_sid[answered.reply_sids[0]].to == "+1555867XXXX"


async def test_export_days_carry_each_message_s_direction(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A day file's rows keep their direction and num_media, the inbound one with status
    received and the flag inbound; the export_inbound_per_day rows still mix in."""
    day = datetime.now(UTC).date() - timedelta(days=3)
    knobs = replace(KNOBS, export_inbound_per_day=1)
    media = (SimMedia("ME" + "1" * 32, "image/png", b"png"),)
    async with open_simulator(knobs, base_url="http://sim", deliver=recorder([])) as sim:
        received = sim.add_message(to=OUR_NUMBER, from_=CUSTOMER, status="received",
                                   direction="inbound", media=media, date_created=noon(day))
        reply = sim.add_message(to=CUSTOMER, direction="outbound-reply",
                                date_created=noon(day) + timedelta(minutes=1))
        sent = sim.add_message(to=CUSTOMER, date_created=noon(day) + timedelta(minutes=2))
        form = f"StartDay={day}&EndDay={day}&FriendlyName=d".encode()
        auth = {"authorization": BASIC_AUTH}
        await handle_api(sim, Request("POST", "/v1/Exports/Messages/Jobs", auth, form))
        await trio.sleep(sim.knobs.export_job_delay)
        days = await handle_api(sim, Request("GET", f"/v1/Exports/Messages/Days/{day}", auth, b""))
        link = json.loads(days.body)["redirect_to"].removeprefix("http://sim")
        file = await handle_api(sim, Request("GET", link, {}, b""))
    rows = [json.loads(line) for line in gzip.decompress(file.body).splitlines()]
    by_sid = {row["sid"]: row for row in rows}
    assert received.sid.startswith("MM")
    assert (by_sid[received.sid]["direction"], by_sid[received.sid]["status"]) == (
        "inbound", "received")
    assert by_sid[received.sid]["flags"] == ["inbound"] and by_sid[received.sid]["num_media"] == 1
    assert by_sid[received.sid]["from"] == CUSTOMER
    assert by_sid[reply.sid]["direction"] == "outbound-reply"
    assert by_sid[sent.sid]["direction"] == "outbound-api"
    assert len(rows) == 4  # and the knob's one made-up received text
    with pytest.raises(ValueError, match="direction"):
        sim.add_message(to=CUSTOMER, direction="sideways")


async def test_the_twilio_client_reads_media_json(nursery: trio.Nursery, app: App) -> None:
    """`messages(sid).media.list()` and `.media(sid).fetch()` parse the simulator's Media.json
    and ME.json in twilio 9.13; the message shows num_media."""
    sim = await sim_for(nursery, app)
    with trio.fail_after(10):
        report = await sim.receive_inbound(text(media=(picture(1), ("image/gif", b"GIF89a"))))
        message = client_for(sim).messages(report.sid)
        listed = await call(message.media.list)
        first = await call(message.media(listed[0].sid).fetch)
        fetched = await call(message.fetch)
        empty = await call(client_for(sim).messages(sim.add_message(to=CUSTOMER).sid).media.list)
    stored = sim.messages[report.sid].media
    assert [m.sid for m in listed] == [m.sid for m in stored]
    assert [m.content_type for m in listed] == ["image/png", "image/gif"]
    assert all(m.parent_sid == report.sid and m.account_sid == ACCOUNT_SID for m in listed)
    assert listed[0].uri == (f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{report.sid}"
                             f"/Media/{stored[0].sid}.json")
    assert listed[0].date_created is not None and listed[0].date_created.tzinfo is not None
    assert (first.sid, first.content_type) == (stored[0].sid, "image/png")
    assert (fetched.num_media, fetched.direction, fetched.status) == ("2", "inbound", "received")
    assert empty == []


async def test_creates_with_media_url_get_made_up_files(nursery: trio.Nursery) -> None:
    """A create with three MediaUrl (a repeated field) is an MM message with three files, their
    type from the URL's extension (image/jpeg when there is none), their bytes from the
    URL; one with a body only has none."""
    sim = await start_sim(nursery)
    client = client_for(sim)
    urls = ["https://example.com/a.png", "https://example.com/b.GIF?x=1", "https://example.com/c"]
    with trio.fail_after(10):
        mms = await call(lambda: client.messages.create(to=CUSTOMER, from_=OUR_NUMBER,
                                                        media_url=urls))
        sms = await call(lambda: client.messages.create(to=CUSTOMER, from_=OUR_NUMBER,
                                                        body="plain"))
        listed = await call(client.messages(mms.sid).media.list)
        async with httpx.AsyncClient() as http:
            redirect = await http.get(sim.base_url + listed[1].uri.removesuffix(".json"),
                                      auth=AUTH)
            file = await http.get(redirect.headers["location"])
    assert mms.sid.startswith("MM") and (mms.num_media, mms.direction) == ("3", "outbound-api")
    assert sms.sid.startswith("SM") and sms.num_media == "0"
    assert [m.content_type for m in listed] == ["image/png", "image/gif", "image/jpeg"]
    assert [m.data for m in sim.messages[mms.sid].media] == [
        b"sim-media:" + url.encode() for url in urls]
    assert file.content == b"sim-media:" + urls[1].encode()
    assert file.headers["content-type"] == "image/gif"


async def test_the_control_route_makes_a_customer_text_us(
    nursery: trio.Nursery, app: App
) -> None:
    """POST /sim/inbound (no auth) sends a text with MediaCount generated files and answers
    the report as JSON; Deliver=false loses the webhook; bad fields, a missing inbound_url
    or another method are refused."""
    sim = await sim_for(nursery, app)
    control = sim.base_url + "/sim/inbound"
    form = {"From": CUSTOMER, "To": OUR_NUMBER, "Body": "from curl", "MediaCount": "2"}
    with trio.fail_after(10):
        async with httpx.AsyncClient() as client:
            sent = await client.post(control, data=form)
            lost = await client.post(control, data={**form, "Deliver": "false"})
            bad = [await client.post(control, data={**form, **change}) for change in (
                {"MediaCount": "11"}, {"MediaCount": "two"}, {"From": ""}, {"To": "nope"},
                {"Deliver": "maybe"})]
            got = await client.get(control)
            sim.knobs = replace(sim.knobs, inbound_url=None)
            nowhere = await client.post(control, data=form)
            picture_file = await client.get(app.hits[0].params["MediaUrl0"], auth=AUTH,
                                            follow_redirects=False)
            png = await client.get(picture_file.headers["location"])
    report = sent.json()
    assert sent.status_code == 200 and report["answered_by"] == "primary"
    assert report.keys() == {"sid", "answered_by", "primary_status", "fallback_status",
                             "twiml", "reply_sids", "errors"}
    [hit] = app.at("/inbound")
    assert hit.params["Body"] == "from curl" and hit.params["NumMedia"] == "2"
    assert (hit.params["MediaContentType0"], hit.params["MediaContentType1"]) == (
        "image/png", "image/jpeg")
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert lost.status_code == 200 and lost.json()["answered_by"] is None
    assert sim.messages[lost.json()["sid"]].direction == "inbound"
    assert [r.status_code for r in bad] == [400] * 5 and all("error" in r.json() for r in bad)
    assert got.status_code == 405
    assert nowhere.status_code == 400 and "inbound_url" in nowhere.json()["error"]
    assert sim.stats.requests == 1  # the media GET: the control route is no API request


def test_inbound_knobs_and_texts_refuse_what_cannot_be() -> None:
    """A timeout <= 0 or a non-HTTP URL, and a text with bad numbers, more than ten files,
    a replied_to or service SID of the wrong shape, are ValueErrors."""
    for knobs in ({"inbound_timeout": 0}, {"inbound_url": "ftp://x"},
                  {"inbound_fallback_url": "/relative"}):
        with pytest.raises(ValueError):
            SimKnobs(ACCOUNT_SID, "t", **knobs)
    for fields in ({"from_": "55"}, {"to": ""}, {"media": (picture(1),) * 11},
                   {"media": (("", b"x"),)}, {"replied_to": "XX" + "0" * 32},
                   {"messaging_service_sid": "MGnope"}):
        with pytest.raises(ValueError):
            NewInbound(**{"from_": CUSTOMER, "to": OUR_NUMBER, "body": "x", **fields})
