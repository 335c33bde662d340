"""`TwilioApi.fetch_message` through the real `twilio` client in real worker threads, against
the simulator, a closed port, and tiny hypercorn servers playing a broken Twilio."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from msgledger.sim import OutcomeWeights, SimKnobs, Simulator, serve_sim
from msgledger.twilio_api import (
    FETCHED_FIELDS,
    CredentialsRefused,
    Fetched,
    Throttled,
    TwilioApi,
    TwilioConfig,
)

from .fake_twilio import answering, fake_twilio

ACCOUNT_SID = "AC" + "d4" * 16
AUTH_TOKEN = "fetch-test-token"
TO = "+15558675309"
UNKNOWN_SID = "SM" + "0" * 32
KNOBS = SimKnobs(ACCOUNT_SID, AUTH_TOKEN, outcome_weights=OutcomeWeights(sent=1), seed=3)
PROBLEM = ('{"type": "https://www.twilio.com/docs/errors/20003", "title": "Authenticate",'
           ' "status": %d, "code": 20003, "detail": "bad credentials"}')


async def start_sim(nursery: trio.Nursery, **knobs: Any) -> Simulator:
    sim: Simulator = await nursery.start(serve_sim, replace(KNOBS, **knobs))
    return sim


def api_for(base_url: str, *, token: str = AUTH_TOKEN, timeout: float = 5.0,
            concurrency: int = 10) -> TwilioApi:
    config = TwilioConfig(ACCOUNT_SID, token, base_url=base_url, timeout=timeout,
                          concurrency=concurrency)
    return TwilioApi(config)


async def test_found_message_has_the_fetched_fields_as_json(nursery: trio.Nursery) -> None:
    """A 200 gives exactly the fetched fields: ISO dates, an int error code, JSON-ready."""
    sim = await start_sim(nursery)
    sent_at = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    failed = sim.add_message(to=TO, status="undelivered", error_code=30003,
                             date_created=sent_at)
    queued = sim.add_message(to=TO, status="queued")
    api = api_for(sim.base_url)
    with trio.fail_after(10):
        outcome = await api.fetch_message(failed.sid)
        pending = await api.fetch_message(queued.sid)
    assert isinstance(outcome, Fetched) and (outcome.http_status, outcome.error_code) == (200, None)
    resource = outcome.resource
    assert set(resource) == set(FETCHED_FIELDS)
    assert json.loads(json.dumps(resource)) == resource
    assert (resource["sid"], resource["status"], resource["error_code"]) == (
        failed.sid, "undelivered", 30003)
    assert resource["error_message"] == "Unreachable destination handset"
    assert resource["date_sent"] == sent_at.isoformat()
    assert datetime.fromisoformat(resource["date_updated"]) == sent_at
    assert (resource["num_segments"], resource["price"], resource["price_unit"]) == (
        "1", "-0.00790", "USD")
    assert isinstance(pending, Fetched) and pending.resource["status"] == "queued"
    assert pending.resource["date_sent"] is None and pending.resource["error_code"] is None


async def test_unknown_sid_is_fetched_404(nursery: trio.Nursery) -> None:
    """An unknown SID, or a malformed one kept in one path segment, is Fetched 404 20404."""
    sim = await start_sim(nursery)
    api = api_for(sim.base_url)
    with trio.fail_after(10):
        unknown = await api.fetch_message(UNKNOWN_SID)
        malformed = await api.fetch_message("../Messages")
    assert isinstance(unknown, Fetched)
    assert (unknown.http_status, unknown.resource, unknown.error_code) == (404, {}, 20404)
    assert unknown.error_message and UNKNOWN_SID in unknown.error_message
    assert isinstance(malformed, Fetched) and malformed.http_status == 404
    assert (sim.stats.fetches, sim.stats.fetches_not_found) == (2, 2)


async def test_429_is_throttled_and_the_next_fetch_served(nursery: trio.Nursery) -> None:
    """A throttled fetch is Throttled with HTTP 429, and is not retried: the next one is
    served."""
    sim = await start_sim(nursery)
    sid = sim.add_message(to=TO).sid
    api = api_for(sim.base_url)
    sim.throttle(requests=1)
    with trio.fail_after(10):
        throttled = await api.fetch_message(sid)
        served = await api.fetch_message(sid)
    assert isinstance(throttled, Throttled) and throttled.http_status == 429
    assert "rate limited" in throttled.reason
    assert isinstance(served, Fetched) and served.http_status == 200
    assert (sim.stats.fetches, sim.stats.requests_429) == (2, 1)


async def test_wrong_token_is_credentials_refused(nursery: trio.Nursery) -> None:
    """A 401 from Twilio is CredentialsRefused with its code."""
    sim = await start_sim(nursery)
    with trio.fail_after(10):
        outcome = await api_for(sim.base_url, token="wrong").fetch_message(UNKNOWN_SID)
    assert isinstance(outcome, CredentialsRefused)
    assert (outcome.http_status, outcome.error_code) == (401, 20003)


async def test_server_error_is_throttled() -> None:
    """A 500 is Throttled with its status."""
    body = '{"code": 20500, "message": "Internal Server Error", "status": 500}'
    with trio.fail_after(10):
        async with fake_twilio(answering(500, body)) as base_url:
            outcome = await api_for(base_url).fetch_message(UNKNOWN_SID)
    assert isinstance(outcome, Throttled) and outcome.http_status == 500
    assert "server error" in outcome.reason


@pytest.mark.parametrize(("status", "expected"), [
    (403, CredentialsRefused(403, 20003, "bad credentials")),
    (503, Throttled("server error (HTTP 503): bad credentials", 503)),
    (400, Fetched(400, {}, 20003, "bad credentials")),
])
async def test_problem_details_body_is_mapped_by_its_status(status: int, expected: Any) -> None:
    """An RFC 9457 body (TwilioServiceException) maps like any error: 403 refuses the
    credentials, 503 throttles, 400 speaks about the message."""
    app = answering(status, PROBLEM % status, "application/problem+json")
    with trio.fail_after(10):
        async with fake_twilio(app) as base_url:
            outcome = await api_for(base_url).fetch_message(UNKNOWN_SID)
    assert outcome == expected


async def test_unparsable_error_code_is_none() -> None:
    """An error code the client cannot read as a number comes back None, never a string."""
    body = json.dumps({"sid": UNKNOWN_SID, "status": "failed", "error_code": "n/a"})
    with trio.fail_after(10):
        async with fake_twilio(answering(200, body)) as base_url:
            outcome = await api_for(base_url).fetch_message(UNKNOWN_SID)
    assert isinstance(outcome, Fetched) and outcome.resource["status"] == "failed"
    assert outcome.resource["error_code"] is None


@pytest.mark.parametrize("body", ["<html>hi</html>", "[]", "null", '{"date_sent": 5}',
                                  '{"status": ["delivered"]}', "[" * 5000 + "]" * 5000],
                         ids=["html", "list", "null", "date-of-a-number", "status-list",
                              "deep"])
async def test_an_unreadable_200_is_an_answer_with_its_error(body: str) -> None:
    """A 200 the client cannot read (a proxy's page, JSON of the wrong shape, so deep it
    overflows the parser) is an answer about the message, with why it could not be read:
    never an exception, and never throttling that would retry it for ever."""
    with trio.fail_after(10):
        async with fake_twilio(answering(200, body)) as base_url:
            outcome = await api_for(base_url).fetch_message(UNKNOWN_SID)
    assert isinstance(outcome, Fetched) and outcome.http_status == 200
    assert outcome.resource == {} and outcome.status is None
    assert str(outcome.error_message).startswith("unreadable answer")


async def test_the_credentials_probe_fetches_the_account(nursery: trio.Nursery) -> None:
    """`check_credentials` asks for the account itself: taken with the right token, refused
    (401) with another, whatever any message's own answer would be."""
    sim = await start_sim(nursery)
    good = await api_for(sim.base_url).check_credentials()
    bad = await api_for(sim.base_url, token="wrong-" + "0" * 26).check_credentials()
    assert good == Fetched(200, {"sid": ACCOUNT_SID, "status": "active"})
    assert isinstance(bad, CredentialsRefused) and bad.http_status == 401


async def test_refused_connection_and_timeout_are_throttled(nursery: trio.Nursery) -> None:
    """No HTTP answer, from a closed port or past the timeout, is Throttled without a status."""
    with trio.socket.socket() as placeholder:
        await placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]  # nothing listens there once it is closed
    sim = await start_sim(nursery, fetch_latency=5.0)
    with trio.fail_after(10):
        refused = await api_for(f"http://127.0.0.1:{closed_port}").fetch_message(UNKNOWN_SID)
        late = await api_for(sim.base_url, timeout=0.2).fetch_message(UNKNOWN_SID)
    assert isinstance(refused, Throttled) and refused.http_status is None
    assert "ConnectionError" in refused.reason
    assert isinstance(late, Throttled) and late.http_status is None
    assert "ReadTimeout" in late.reason


async def test_fetches_in_flight_stay_within_the_concurrency(nursery: trio.Nursery) -> None:
    """Ten fetches at once through an API of concurrency 3 reach Twilio at most 3 at a time."""
    sim = await start_sim(nursery, fetch_latency=0.2)
    sid = sim.add_message(to=TO).sid
    api = api_for(sim.base_url, concurrency=3)
    outcomes: list[Any] = []

    async def fetch() -> None:
        outcomes.append(await api.fetch_message(sid))

    with trio.fail_after(10):
        async with trio.open_nursery() as fetches:
            for _ in range(10):
                fetches.start_soon(fetch)
    assert [type(o) for o in outcomes] == [Fetched] * 10
    assert (sim.stats.fetches, sim.stats.peak_in_flight) == (10, 3)
