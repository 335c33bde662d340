"""The Twilio simulator, driven by the real `twilio` client over real HTTP.

Client calls block, so they run in worker threads. Signed callbacks land on a small hypercorn
receiver that checks every signature with `RequestValidator`. Knob statistics are pinned on
Trio's virtual clock with a fake `deliver`, where no socket is involved.
"""

from __future__ import annotations

import base64
import math
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import pytest
import requests
import trio
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from msgledger.http.server import answer_lifespan
from msgledger.sim import (
    Callback,
    DeliveryReport,
    OutcomeWeights,
    SimKnobs,
    SimMessage,
    Simulator,
    build_callback,
    open_callback_sender,
    open_simulator,
    serve_sim,
)
from msgledger.sim._app import handle_api
from msgledger.sim._http import Request

from .fake_twilio import read_body, serve_on_loopback

ACCOUNT_SID = "AC" + "a1" * 16
AUTH_TOKEN = "sim-test-token"
SERVICE_SID = "MG" + "b2" * 16
TO = "+15558675309"
FROM = "+15005550006"
ALWAYS_DELIVERED = OutcomeWeights(delivered=1, undelivered=0, failed=0)
KNOBS = SimKnobs(
    ACCOUNT_SID,
    AUTH_TOKEN,
    step_delay=(0.001, 0.003),
    outcome_weights=ALWAYS_DELIVERED,
    seed=7,
)
BASIC_AUTH = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
T = TypeVar("T")
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Received:
    """One callback as the receiver saw it."""

    url: str
    params: dict[str, str]
    token: str
    signature_valid: bool

    @property
    def status(self) -> str:
        return self.params["MessageStatus"]


class Receiver:
    """A StatusCallback endpoint: records each POST, checks its signature, answers `status`."""

    def __init__(self) -> None:
        self.base_url = ""
        self.status = 200
        self.received: list[Received] = []
        self._validator = RequestValidator(AUTH_TOKEN)

    def by_sid(self) -> dict[str, list[Received]]:
        grouped: dict[str, list[Received]] = defaultdict(list)
        for callback in self.received:
            grouped[callback.params["MessageSid"]].append(callback)
        return grouped

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        self._record(scope, body)
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def _record(self, scope: dict[str, Any], body: bytes) -> None:
        query = scope["query_string"].decode()
        url = self.base_url + scope["raw_path"].decode() + (f"?{query}" if query else "")
        params = dict(parse_qsl(body.decode()))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        valid = self._validator.validate(url, params, headers.get("x-twilio-signature", ""))
        token = headers.get("i-twilio-idempotency-token", "")
        self.received.append(Received(url, params, token, bool(valid)))


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    """A running callback receiver on 127.0.0.1, stopped with the test."""
    app = Receiver()
    app.base_url = await serve_on_loopback(nursery, app)
    return app


async def start_sim(nursery: trio.Nursery, **knobs: Any) -> Simulator:
    sim: Simulator = await nursery.start(serve_sim, replace(KNOBS, **knobs))
    return sim


def client_for(sim: Simulator, token: str = AUTH_TOKEN) -> Client:
    """The real client pointed at the simulator (a non-empty environment ignores TWILIO_EDGE)."""
    http = TwilioHttpClient(timeout=5)
    client = Client(ACCOUNT_SID, token, environment={"_": "_"}, http_client=http)
    client.api.base_url = sim.base_url
    return client


async def call(fn: Callable[[], T]) -> T:
    """Run a blocking client call in a worker thread."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def answer(sim: Simulator, method: str, resource: str, body: bytes = b"") -> int:
    """One API request straight to the handler, no socket (so it runs on virtual time)."""
    path = f"/2010-04-01/Accounts/{ACCOUNT_SID}/{resource}"
    reply = await handle_api(sim, Request(method, path, {"authorization": BASIC_AUTH}, body))
    return reply.status


async def timed(request: Awaitable[int]) -> tuple[int, float]:
    """The status a request got and the Trio seconds it took."""
    started = trio.current_time()
    status = await request
    return status, trio.current_time() - started


def create(client: Client, **params: Any) -> Callable[[], Any]:
    """A create call with default To, From and Body, ready for `call`."""
    return lambda: client.messages.create(**{"to": TO, "from_": FROM, "body": "hi", **params})


def spawn(sim: Simulator, count: int, status_callback: str | None = None) -> None:
    """Inject `count` queued messages that live on as if created through the API."""
    for _ in range(count):
        sim.add_message(to=TO, status="queued", status_callback=status_callback, run_lifecycle=True)


def sample_message() -> SimMessage:
    """A delivered message as the simulator stores it, for delivery tests without a server."""
    now = datetime.now(UTC).replace(microsecond=0)
    return SimMessage(
        sid="SM" + "c3" * 16,
        account_sid=ACCOUNT_SID,
        to=TO,
        from_=FROM,
        body="hi",
        status="delivered",
        error_code=None,
        error_message=None,
        date_created=now,
        date_updated=now,
        date_sent=now,
        status_callback=None,
        messaging_service_sid=None,
        price="-0.00790",
        num_segments="1",
        seq=0,
    )


def recorder(sink: list[Callback]) -> Callable[[Callback], Awaitable[DeliveryReport]]:
    """A fake `deliver` that takes a little (virtual) transit time and records each callback."""

    async def deliver(callback: Callback) -> DeliveryReport:
        await trio.sleep(0.05)  # so concurrent lifecycles interleave
        sink.append(callback)
        return DeliveryReport(attempts=1, delivered=True)

    return deliver


def statuses_by_sid(callbacks: Iterable[Callback]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for callback in callbacks:
        grouped[callback.params["MessageSid"]].append(callback.params["MessageStatus"])
    return grouped


def expected_statuses(final: str) -> list[str]:
    """The callbacks an SMS that started `queued` gets on its way to `final`."""
    return {
        "failed": ["failed"],
        "sent": ["sent"],
        "delivered": ["sent", "delivered"],
        "undelivered": ["sent", "undelivered"],
    }[final]


async def test_create_answers_201_then_signed_callbacks_follow(
    nursery: trio.Nursery, receiver: Receiver
) -> None:
    """Create answers 201 with a queued resource, then `sent` and `delivered` arrive signed."""
    sim = await start_sim(nursery)
    client = client_for(sim)
    url = receiver.base_url + "/status?ref=order-1"
    with trio.fail_after(10):
        message = await call(create(client, status_callback=url + "#rc=2"))
        await sim.wait_idle()
    assert message.status == "queued" and message.sid.startswith("SM") and len(message.sid) == 34
    assert (message.to, message.from_, message.direction) == (TO, FROM, "outbound-api")
    assert message.date_created is not None and message.date_created.tzinfo is not None
    assert message.num_segments == "1" and message.error_code is None
    assert message.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message.sid}.json"
    callbacks = receiver.received
    assert [c.status for c in callbacks] == ["sent", "delivered"]
    assert all(c.signature_valid and c.url == url for c in callbacks)  # fragment stripped
    assert len({c.token for c in callbacks}) == 2
    sent, delivered = (c.params for c in callbacks)
    assert sent["MessageSid"] == sent["SmsSid"] == message.sid and sent["SmsStatus"] == "sent"
    assert (sent["AccountSid"], sent["From"], sent["To"]) == (ACCOUNT_SID, FROM, TO)
    assert sent["ApiVersion"] == "2010-04-01" and "RawDlrDoneDate" not in sent
    assert len(delivered["RawDlrDoneDate"]) == 10 and "ErrorCode" not in delivered
    assert sim.messages[message.sid].status == "delivered"
    assert sim.stats.messages_created == 1 and sim.stats.callbacks_delivered == 2


async def test_messaging_service_starts_accepted_and_calls_back_queued(
    nursery: trio.Nursery, receiver: Receiver
) -> None:
    """A Messaging Service send starts `accepted`; its `queued` callback names the sender."""
    sim = await start_sim(nursery)
    client = client_for(sim)
    url = receiver.base_url + "/status"
    with trio.fail_after(10):
        send = create(client, from_=None, messaging_service_sid=SERVICE_SID, status_callback=url)
        message = await call(send)
        await sim.wait_idle()
    assert (message.status, message.from_, message.num_segments) == ("accepted", None, "0")
    assert [c.status for c in receiver.received] == ["queued", "sent", "delivered"]
    assert all(c.params["MessagingServiceSid"] == SERVICE_SID for c in receiver.received)
    assert receiver.received[0].params["From"] == FROM


async def test_invalid_create_requests_raise_twilio_errors(nursery: trio.Nursery) -> None:
    """Bad To, missing To and missing From raise TwilioRestException 400 with Twilio's codes."""
    sim = await start_sim(nursery)
    client = client_for(sim)
    attempts = {
        21211: create(client, to="555-1234"),
        21604: create(client, to=""),
        21603: create(client, from_=None),
    }
    errors: dict[int, TwilioRestException] = {}
    with trio.fail_after(10):
        for code, attempt in attempts.items():
            with pytest.raises(TwilioRestException) as raised:
                await call(attempt)
            errors[code] = raised.value
    assert {(e.status, e.code) for e in errors.values()} == {(400, c) for c in attempts}
    assert "The 'To' number 555-1234 is not a valid phone number." in errors[21211].msg
    assert not sim.messages


async def test_wrong_credentials_and_unknown_sid_raise(nursery: trio.Nursery) -> None:
    """A wrong token or another account's path raises 401 code 20003; an unknown SID 404 20404."""
    sim = await start_sim(nursery)
    unknown = "SM" + "0" * 32
    other_account = client_for(sim).api.v2010.accounts("AC" + "f" * 32)
    with trio.fail_after(10):
        with pytest.raises(TwilioRestException) as denied:
            await call(client_for(sim, token="wrong").messages(unknown).fetch)
        with pytest.raises(TwilioRestException) as elsewhere:
            await call(other_account.messages(unknown).fetch)
        with pytest.raises(TwilioRestException) as missing:
            await call(client_for(sim).messages(unknown).fetch)
    assert (denied.value.status, denied.value.code) == (401, 20003)
    assert (elsewhere.value.status, elsewhere.value.code) == (401, 20003)
    assert (missing.value.status, missing.value.code) == (404, 20404)
    assert (sim.stats.fetches, sim.stats.fetches_not_found) == (3, 1)


async def test_latency_delays_every_answer(nursery: trio.Nursery) -> None:
    """The latency knob holds each API answer back by at least that many seconds."""
    sim = await start_sim(nursery, latency=0.2)
    client = client_for(sim)
    with trio.fail_after(10):
        started = trio.current_time()
        await call(client.messages.list)
        await call(create(client))
    assert trio.current_time() - started >= 0.4


async def test_fetch_latency_delays_only_fetches(autojump_clock: trio.abc.Clock) -> None:
    """On virtual time a fetch, found or not, takes latency + fetch_latency; a list or a
    create only latency."""
    knobs = replace(KNOBS, latency=0.5, fetch_latency=2.0)
    form = urlencode({"To": TO, "From": FROM, "Body": "hi"}).encode()
    async with open_simulator(knobs, base_url="http://sim", deliver=recorder([])) as sim:
        sid = sim.add_message(to=TO).sid
        found = await timed(answer(sim, "GET", f"Messages/{sid}.json"))
        missing = await timed(answer(sim, "GET", f"Messages/SM{'0' * 32}.json"))
        listed = await timed(answer(sim, "GET", "Messages.json"))
        created = await timed(answer(sim, "POST", "Messages.json", form))
    assert (found, missing) == ((200, 2.5), (404, 2.5))
    assert (listed, created) == ((200, 0.5), (201, 0.5))
    assert (sim.stats.fetches, sim.stats.fetches_not_found, sim.stats.requests) == (2, 1, 4)


async def test_throttle_for_requests_answers_429s_then_serves(nursery: trio.Nursery) -> None:
    """`throttle(requests=2)` answers the next two requests 429 20429, creating nothing, then
    serves again."""
    sim = await start_sim(nursery)
    client = client_for(sim)
    sid = sim.add_message(to=TO).sid
    sim.throttle(requests=2)
    with trio.fail_after(10):
        with pytest.raises(TwilioRestException) as fetched:
            await call(client.messages(sid).fetch)
        with pytest.raises(TwilioRestException) as created:
            await call(create(client))
        served = await call(client.messages(sid).fetch)
    assert (fetched.value.status, fetched.value.code) == (429, 20429)
    assert (created.value.status, created.value.code) == (429, 20429)
    assert served.sid == sid and list(sim.messages) == [sid]
    assert (sim.stats.requests_429, sim.stats.messages_created, sim.stats.fetches) == (2, 0, 2)


async def test_throttle_until_answers_429_until_that_trio_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    """On virtual time `throttle(until=t)` answers 429 before t and serves from t on; a new
    call replaces the burst, and `throttle(requests=0)` ends one."""
    async with open_simulator(KNOBS, base_url="http://sim", deliver=recorder([])) as sim:
        fetch = f"Messages/{sim.add_message(to=TO).sid}.json"
        sim.throttle(until=trio.current_time() + 10)
        during = [await answer(sim, "GET", fetch), await answer(sim, "GET", "Messages.json")]
        await trio.sleep(9.99)
        last = await answer(sim, "GET", fetch)
        await trio.sleep(0.01)
        after = await answer(sim, "GET", fetch)
        sim.throttle(until=math.inf)
        sim.throttle(requests=0)
        ended = await answer(sim, "GET", fetch)
    assert (during, last, after, ended) == ([429, 429], 429, 200, 200)
    assert sim.stats.requests_429 == 3


async def test_in_flight_is_left_when_a_request_is_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A request cancelled during its latency no longer counts in flight; the peak stays."""
    knobs = replace(KNOBS, latency=10.0)
    async with open_simulator(knobs, base_url="http://sim", deliver=recorder([])) as sim:
        with trio.move_on_after(1):
            await answer(sim, "GET", "Messages.json")
    assert (sim.stats.in_flight, sim.stats.peak_in_flight, sim.stats.requests) == (0, 1, 1)


async def test_peak_in_flight_shows_the_concurrency_a_client_used(
    nursery: trio.Nursery,
) -> None:
    """Six fetches sent at once, each held 0.5 s, are six in flight at the peak; a reset
    peak then counts afresh."""
    sim = await start_sim(nursery, fetch_latency=0.5)
    sid = sim.add_message(to=TO).sid
    with trio.fail_after(10):
        async with trio.open_nursery() as fetches:
            for _ in range(6):
                fetches.start_soon(call, client_for(sim).messages(sid).fetch)
        peak, in_flight = sim.stats.peak_in_flight, sim.stats.in_flight
        sim.stats.peak_in_flight = 0
        await call(client_for(sim).messages(sid).fetch)
    assert (peak, in_flight, sim.stats.fetches) == (6, 0, 7)
    assert sim.stats.peak_in_flight == 1


async def test_list_pages_return_every_message_once_newest_first(nursery: trio.Nursery) -> None:
    """Streaming in pages of 4 yields all 23 messages exactly once, newest `date_sent` first."""
    sim = await start_sim(nursery)
    start = datetime(2024, 5, 1, 12, tzinfo=UTC)
    for i in range(23):
        sim.add_message(to=TO, body=f"m{i}", date_sent=start + timedelta(hours=7 * i))
    requests_before = sim.stats.requests
    with trio.fail_after(10):
        listed = await call(lambda: list(client_for(sim).messages.stream(page_size=4)))
    sids = [m.sid for m in listed]
    assert sorted(sids) == sorted(sim.messages) and len(set(sids)) == 23
    sent = [m.date_sent for m in listed]
    assert sent == sorted(sent, reverse=True)
    assert sim.stats.requests - requests_before == 6  # ceil(23 / 4) pages


async def test_list_date_filters_count_whole_days(nursery: trio.Nursery) -> None:
    """DateSent, DateSent< and DateSent> match GMT days, inclusive, whatever the time of day."""
    sim = await start_sim(nursery)
    for day in range(1, 6):
        for hour in (0, 23):
            sent = datetime(2024, 5, day, hour, 30, tzinfo=UTC)
            sim.add_message(to=TO, body=f"{day}/{hour}", date_sent=sent)
    messages = client_for(sim).messages

    def days(**filters: Any) -> list[int]:
        return sorted({m.date_sent.day for m in messages.list(page_size=3, **filters)})

    between = {"date_sent_after": "2024-05-02", "date_sent_before": "2024-05-03"}
    with trio.fail_after(10):
        assert await call(lambda: days(date_sent=date(2024, 5, 3))) == [3]
        assert await call(lambda: days(date_sent_before=date(2024, 5, 2))) == [1, 2]
        late = datetime(2024, 5, 4, 23, 59, tzinfo=UTC)
        assert await call(lambda: days(date_sent_after=late)) == [4, 5]
        assert await call(lambda: days(**between)) == [2, 3]
        assert await call(lambda: days(to="+15550000000")) == []


async def test_keyset_paging_ignores_messages_created_meanwhile(nursery: trio.Nursery) -> None:
    """Messages created between pages neither repeat nor hide the ones already being paged."""
    sim = await start_sim(nursery)
    start = datetime(2024, 5, 1, tzinfo=UTC)
    originals = [sim.add_message(to=TO, date_sent=start + timedelta(seconds=i)) for i in range(9)]
    messages = client_for(sim).messages
    with trio.fail_after(10):
        page = await call(lambda: messages.page(page_size=4))
        seen = [m.sid for m in page]
        while page is not None:
            sim.add_message(to=TO)  # newer than every original: lands before the cursor
            page = await call(page.next_page)
            seen += [m.sid for m in page or ()]
    assert seen == [m.sid for m in reversed(originals)]


async def test_rate_limit_answers_429_and_processes_nothing(nursery: trio.Nursery) -> None:
    """With the 429 knob on, fetch raises TwilioRestException 20429, a list page TwilioException."""
    sim = await start_sim(nursery, rate_limit_429=1.0)
    client = client_for(sim)
    with trio.fail_after(10):
        with pytest.raises(TwilioRestException) as fetched:
            await call(client.messages("SM" + "0" * 32).fetch)
        with pytest.raises(TwilioException) as listed:
            await call(client.messages.list)
        with pytest.raises(TwilioRestException) as created:
            await call(create(client))
    assert (fetched.value.status, fetched.value.code) == (429, 20429)
    assert not isinstance(listed.value, TwilioRestException)
    assert listed.value.args[1].status_code == 429
    assert created.value.code == 20429 and not sim.messages
    assert sim.stats.requests_429 == 3


async def test_lost_create_response_leaves_the_message_alive(
    nursery: trio.Nursery, receiver: Receiver
) -> None:
    """A dropped create answer raises requests' ConnectionError, yet the message lives on."""
    sim = await start_sim(nursery, lose_create_response=1.0)
    client = client_for(sim)
    with trio.fail_after(10):
        with pytest.raises(requests.exceptions.ConnectionError) as raised:
            await call(create(client, status_callback=receiver.base_url + "/status"))
        await sim.wait_idle()
    assert not isinstance(raised.value, TwilioException)
    assert "without response" in str(raised.value)
    [message] = sim.messages.values()
    assert message.status == "delivered" and sim.stats.create_responses_lost == 1
    assert sim.stats.in_flight == 0  # the dropped request left the count
    assert [c.status for c in receiver.received] == ["sent", "delivered"]


async def test_refused_connection_raises_connection_error(nursery: trio.Nursery) -> None:
    """With nothing listening, the client raises the same requests ConnectionError type."""
    async with trio.open_nursery() as inner:
        sim = await start_sim(inner)
        inner.cancel_scope.cancel()
    with trio.fail_after(10), pytest.raises(requests.exceptions.ConnectionError) as raised:
        await call(client_for(sim).messages("SM" + "0" * 32).fetch)
    assert "Connection refused" in str(raised.value)


async def test_redaction_hides_the_last_four_digits_after_create(nursery: trio.Nursery) -> None:
    """With redaction on, create shows the full `to` but fetch and list end it in XXXX."""
    sim = await start_sim(nursery, redact_to=True)
    client = client_for(sim)
    with trio.fail_after(10):
        created = await call(create(client))
        fetched = await call(client.messages(created.sid).fetch)
        [listed] = await call(client.messages.list)
    assert created.to == TO and sim.messages[created.sid].to == TO
    assert fetched.to == listed.to == "+1555867XXXX"


async def test_whatsapp_message_is_read_after_delivered(
    nursery: trio.Nursery, receiver: Receiver
) -> None:
    """A WhatsApp message's callbacks end with `read` (EventType=READ) and carry no DLR date."""
    sim = await start_sim(nursery)
    client = client_for(sim)
    whatsapp = {"to": "whatsapp:" + TO, "from_": "whatsapp:" + FROM}
    with trio.fail_after(10):
        await call(create(client, **whatsapp, status_callback=receiver.base_url + "/wa"))
        await sim.wait_idle()
    assert [c.status for c in receiver.received] == ["sent", "delivered", "read"]
    assert receiver.received[-1].params["EventType"] == "READ"
    assert all(c.params["ChannelPrefix"] == "whatsapp" for c in receiver.received)
    assert not any("RawDlrDoneDate" in c.params for c in receiver.received)


async def test_failures_carry_error_codes(nursery: trio.Nursery, receiver: Receiver) -> None:
    """`failed` and `undelivered` callbacks carry an ErrorCode, and fetch shows the same code."""
    # Seeded: unseeded, all eight may draw one outcome (2 x 0.5^8, 1 run in 128), as in CI once.
    sim = await start_sim(nursery, outcome_weights=OutcomeWeights(0, 1, 1), seed=11)
    client = client_for(sim)
    url = receiver.base_url + "/status"
    with trio.fail_after(10):
        for _ in range(8):
            await call(create(client, status_callback=url))
        await sim.wait_idle()
        fetched = [await call(client.messages(sid).fetch) for sid in sim.messages]
    finals = {sid: calls[-1] for sid, calls in receiver.by_sid().items()}
    assert {c.status for c in finals.values()} == {"failed", "undelivered"}
    for message in fetched:
        assert message.error_code == int(finals[message.sid].params["ErrorCode"])
        assert message.error_message


async def test_callbacks_retry_once_on_connection_failure_by_default() -> None:
    """A refused callback is tried twice by default and once with `#rc=0` (Twilio's overrides)."""
    with trio.socket.socket() as placeholder:
        await placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]  # nothing listens there once it is closed
    message = sample_message()
    url = f"http://127.0.0.1:{closed_port}/status"
    with trio.fail_after(10):
        async with open_callback_sender() as deliver:
            default = await deliver(build_callback(message, url, AUTH_TOKEN, "t1"))
            no_retry = await deliver(build_callback(message, url + "#rc=0", AUTH_TOKEN, "t2"))
    assert default == DeliveryReport(attempts=2, delivered=False)
    assert no_retry == DeliveryReport(attempts=1, delivered=False)


async def test_5xx_is_retried_only_when_the_fragment_asks(receiver: Receiver) -> None:
    """A 503 is not retried by default; `#rp=5xx&rc=2` retries it twice with the same token."""
    receiver.status = 503
    message = sample_message()
    url = receiver.base_url + "/status?x=1"
    with trio.fail_after(10):
        async with open_callback_sender() as deliver:
            plain = await deliver(build_callback(message, url, AUTH_TOKEN, "t1"))
            retry = await deliver(build_callback(message, url + "#rp=5xx&rc=2", AUTH_TOKEN, "t2"))
    assert plain == DeliveryReport(attempts=1, delivered=False)
    assert retry == DeliveryReport(attempts=3, delivered=False)
    assert [c.token for c in receiver.received] == ["t1", "t2", "t2", "t2"]
    assert all(c.signature_valid and c.url == url for c in receiver.received)


@pytest.mark.deadline(3600)  # virtual seconds: ~160 pass, steps of up to 60 s
async def test_callback_knobs_lose_duplicate_and_reorder(autojump_clock: trio.abc.Clock) -> None:
    """On virtual time, loss, duplication and reordering all happen, and the counters add up."""
    knobs = replace(
        KNOBS,
        step_delay=(1.0, 60.0),
        callback_loss=0.2,
        callback_duplication=0.2,
        callback_reordering=0.5,
        outcome_weights=OutcomeWeights(),
    )
    delivered: list[Callback] = []
    with trio.fail_after(3600):
        async with open_simulator(knobs, base_url="http://sim", deliver=recorder(delivered)) as sim:
            spawn(sim, 200, status_callback="http://cb")
            await sim.wait_idle()
    expected = {sid: expected_statuses(m.status) for sid, m in sim.messages.items()}
    per_token = Counter(c.idempotency_token for c in delivered)
    unique = list({c.idempotency_token: c for c in delivered}.values())
    assert sum(n == 2 for n in per_token.values()) == sim.stats.callbacks_duplicated > 0
    assert len(unique) + sim.stats.callbacks_lost == sum(map(len, expected.values()))
    assert sim.stats.callbacks_lost > 0
    out_of_order = 0
    for sid, statuses in statuses_by_sid(unique).items():
        assert set(statuses) <= set(expected[sid])
        out_of_order += statuses != [s for s in expected[sid] if s in statuses]
    assert out_of_order > 0
    assert sim.stats.callbacks_sent == len(delivered) == sim.stats.callbacks_delivered


@pytest.mark.deadline(3600)  # virtual seconds: ~160 pass, steps of up to 60 s
async def test_without_knobs_every_callback_arrives_once_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    """With the fault knobs at zero, each message's callbacks arrive exactly once and in order."""
    knobs = replace(KNOBS, step_delay=(1.0, 60.0), outcome_weights=OutcomeWeights(sent=1))
    delivered: list[Callback] = []
    with trio.fail_after(3600):
        async with open_simulator(knobs, base_url="http://sim", deliver=recorder(delivered)) as sim:
            spawn(sim, 100, status_callback="http://cb")
            await sim.wait_idle()
    by_sid = statuses_by_sid(delivered)
    assert by_sid.keys() == sim.messages.keys() and len(by_sid) == 100  # each called back
    for sid, statuses in by_sid.items():
        assert statuses == expected_statuses(sim.messages[sid].status)
    assert len(delivered) == sim.stats.callbacks_sent == sim.stats.callbacks_delivered


async def test_same_seed_replays_the_same_run(autojump_clock: trio.abc.Clock) -> None:
    """Two simulators with the same seed give the same SIDs and the same outcomes."""
    knobs = replace(KNOBS, outcome_weights=OutcomeWeights(), seed=42)

    async def run() -> list[tuple[str, str]]:
        async with open_simulator(knobs, base_url="http://sim", deliver=recorder([])) as sim:
            spawn(sim, 50)
            await sim.wait_idle()
        return [(m.sid, m.status) for m in sim.messages.values()]

    with trio.fail_after(600):
        first, second = await run(), await run()
    assert first == second and len({status for _, status in first}) > 1


async def test_many_concurrent_lifecycles_all_call_back(
    nursery: trio.Nursery, receiver: Receiver
) -> None:
    """150 concurrent lifecycles deliver every callback, validly signed, through the pool."""
    sim = await start_sim(nursery)
    with trio.fail_after(20):
        spawn(sim, 150, status_callback=receiver.base_url + "/status")
        await sim.wait_idle()
    assert len(receiver.received) == 300 == sim.stats.callbacks_delivered
    assert all(c.signature_valid for c in receiver.received)
    assert sim.stats.callbacks_failed == 0
