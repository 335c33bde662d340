"""The simulator's Bulk Export, list lag and delayed redaction, driven by the real `twilio`
client over real HTTP (`client.bulkexports.base_url = sim.base_url`).

Timers that count Trio time (a job's delay, a link's life) are pinned on virtual time by
calling the handler with no socket; message ages count on the wall clock, so those tests
inject past dates. Exports only take days at least two UTC days old, so every day here is
counted back from today.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
import trio
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.rest import Client

from msgledger.sim import SimKnobs, Simulator, open_simulator
from msgledger.sim._app import handle_api
from msgledger.sim._http import Request, Response

from .test_sim import (
    ACCOUNT_SID,
    BASIC_AUTH,
    FROM,
    KNOBS,
    SERVICE_SID,
    TO,
    call,
    client_for,
    create,
    recorder,
    start_sim,
)

TODAY = datetime.now(UTC).date()
DAY = TODAY - timedelta(days=3)  # a day with messages
QUIET_DAY = TODAY - timedelta(days=4)  # a day with none
FILE_FIELDS = {  # docs/twilio.md, "Bulk Export"; flags, start and price are a real file's extras
    "date_updated", "date_sent", "date_created", "body", "num_segments", "sid", "num_media",
    "messaging_service_sid", "account_sid", "from", "error_code", "to", "status", "direction",
    "flags", "start", "price",
}
JOBS = "/v1/Exports/Messages/Jobs"


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), UTC)


def exports_client(sim: Simulator) -> Client:
    """The real client with both the api and the bulkexports domains on the simulator."""
    client = client_for(sim)
    client.bulkexports.base_url = sim.base_url
    return client


def job_form(start: date, end: date, name: str = "recon") -> dict[str, str]:
    return {"StartDay": start.isoformat(), "EndDay": end.isoformat(), "FriendlyName": name}


async def ask(sim: Simulator, method: str, target: str, form: dict[str, str] | None = None
              ) -> Response:
    """One request straight to the handler, no socket (so it runs on virtual time)."""
    body = urlencode(form or {}).encode()
    return await handle_api(sim, Request(method, target, {"authorization": BASIC_AUTH}, body))


def answer_json(reply: Response) -> Any:
    return json.loads(reply.body)


def statuses(details: list[dict[str, Any]]) -> dict[str, list[str]]:
    """A job's details as {status: days}, counts checked."""
    assert all(group["count"] == len(group["days"]) for group in details)
    return {group["status"]: group["days"] for group in details}


def rows(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(data).splitlines()]


def lines(data: bytes) -> Iterator[bytes]:
    return iter(gzip.decompress(data).splitlines())


async def completed_day_file(sim: Simulator, day: date) -> bytes:
    """On virtual time: a job for `day`, completed, and its file downloaded."""
    await ask(sim, "POST", JOBS, job_form(day, day))
    await trio.sleep(sim.knobs.export_job_delay)
    link = answer_json(await ask(sim, "GET", f"/v1/Exports/Messages/Days/{day}"))["redirect_to"]
    reply = await ask(sim, "GET", link.removeprefix(sim.base_url))
    assert reply.status == 200
    return reply.body


async def test_a_job_reaches_every_route_through_the_real_client(nursery: trio.Nursery) -> None:
    """Create, fetch, the days list and a day's 307 all parse in twilio 9.13; the link gives
    the gzip file of the day's messages, once; a day with none has no file (404)."""
    sim = await start_sim(nursery, export_job_delay=0.0)
    failed = sim.add_message(to=TO, status="failed", error_code=30008, date_created=noon(DAY))
    served = sim.add_message(to=TO, from_=FROM, body="x" * 200, messaging_service_sid=SERVICE_SID,
                             date_sent=noon(DAY) + timedelta(hours=1))
    exports = exports_client(sim).bulkexports.v1.exports
    with trio.fail_after(10):
        job = await call(lambda: exports("Messages").export_custom_jobs.create(
            start_day=QUIET_DAY.isoformat(), end_day=DAY.isoformat(), friendly_name="recon",
            webhook_url="https://example.com/done", webhook_method="POST"))
        fetched = await call(exports.jobs(job.job_sid).fetch)
        [listed] = await call(lambda: exports("Messages").days.list(page_size=400))
        day = await call(exports("Messages").days(DAY.isoformat()).fetch)
        first = await call(lambda: requests.get(day.redirect_to, timeout=5))
        second = await call(lambda: requests.get(day.redirect_to, timeout=5))
        with pytest.raises(TwilioRestException) as quiet:
            await call(exports("Messages").days(QUIET_DAY.isoformat()).fetch)
    assert job.job_sid.startswith("JS") and len(job.job_sid) == 34
    assert (job.start_day, job.end_day, job.friendly_name) == (str(QUIET_DAY), str(DAY), "recon")
    assert (job.resource_type, job.webhook_url, job.webhook_method) == (
        "Messages", "https://example.com/done", "POST")
    assert statuses(job.details) == {"Submitted": [str(QUIET_DAY), str(DAY)]}
    assert statuses(fetched.details) == {"CompletedEmptyRecords": [str(QUIET_DAY)],
                                         "Completed": [str(DAY)]}
    assert fetched.url == f"{sim.base_url}/v1/Exports/Jobs/{job.job_sid}"
    assert (listed.day, listed.resource_type) == (str(DAY), "Messages")
    assert listed.friendly_name == "recon"
    assert listed.create_date == str(TODAY) and listed.size == len(first.content)
    assert day.redirect_to.startswith(sim.base_url + "/_export_files/")
    assert first.status_code == 200 and second.status_code == 403
    by_sid = {row["sid"]: row for row in rows(first.content)}
    assert list(by_sid) == [failed.sid, served.sid]
    assert all(row.keys() == FILE_FIELDS for row in by_sid.values())
    assert by_sid[failed.sid] | {"flags": None, "start": None} == {
        "date_updated": f"{DAY}T12:00:00Z", "date_sent": None, "date_created": f"{DAY}T12:00:00Z",
        "body": "", "num_segments": 1, "sid": failed.sid, "num_media": 0,
        "messaging_service_sid": None, "account_sid": ACCOUNT_SID, "from": FROM,
        "error_code": 30008, "to": TO, "status": "failed", "direction": "outbound-api",
        "flags": None, "start": None, "price": None}
    assert by_sid[served.sid]["date_sent"] == f"{DAY}T13:00:00Z"
    assert by_sid[served.sid]["error_code"] == 0 and by_sid[served.sid]["num_segments"] == 2
    assert by_sid[served.sid]["messaging_service_sid"] == SERVICE_SID
    assert (quiet.value.status, quiet.value.code) == (404, 20404)
    stats = sim.stats
    assert (stats.export_jobs_created, stats.export_day_fetches) == (1, 2)
    assert (stats.export_downloads, stats.export_links_refused) == (1, 1)


async def test_a_job_completes_after_its_delay_from_the_messages_then(
    autojump_clock: trio.abc.Clock,
) -> None:
    """On virtual time a job is Submitted, then Running from half its delay, and Completed
    at its end; its file holds the messages as they were then, not as they became."""
    async with open_simulator(KNOBS, base_url="http://sim", deliver=recorder([])) as sim:
        sid = sim.add_message(to=TO, status="sent", date_created=noon(DAY)).sid
        job = answer_json(await ask(sim, "POST", JOBS, job_form(DAY, DAY)))
        target = f"/v1/Exports/Jobs/{job['job_sid']}"
        seen = []
        for wait in (29, 2, 27, 2):
            await trio.sleep(wait)
            if seen == ["Submitted", "Running", "Running"]:
                sim.set_status(sid, "delivered")  # before completion: in the file
            seen += statuses(answer_json(await ask(sim, "GET", target))["details"])
        sim.set_status(sid, "undelivered", error_code=30003)  # after: not in it
        link = answer_json(await ask(sim, "GET", f"/v1/Exports/Messages/Days/{DAY}"))
        download = await ask(sim, "GET", link["redirect_to"].removeprefix("http://sim"))
        missing = await ask(sim, "GET", "/v1/Exports/Jobs/JS" + "0" * 32)
    assert seen == ["Submitted", "Running", "Running", "Completed"]
    assert job["job_queue_position"] == "1" and job["estimated_completion_time"].endswith("Z")
    [row] = rows(download.body)
    assert (row["sid"], row["status"], row["error_code"]) == (sid, "delivered", 0)
    assert missing.status == 404 and answer_json(missing)["code"] == 20404


async def test_days_export_only_from_two_utc_days_after(nursery: trio.Nursery) -> None:
    """EndDay must be two UTC days before today; malformed days, StartDay after EndDay and
    a missing FriendlyName are refused with 400 and Twilio's error JSON."""
    sim = await start_sim(nursery)
    jobs = exports_client(sim).bulkexports.v1.exports("Messages").export_custom_jobs
    yesterday, two_ago = TODAY - timedelta(days=1), TODAY - timedelta(days=2)
    refused = {
        "yesterday": (two_ago.isoformat(), yesterday.isoformat()),
        "malformed": ("2024-5-1", "2024-05-02"),
        "no such day": ("2024-02-30", "2024-03-01"),
        "backwards": (two_ago.isoformat(), (two_ago - timedelta(days=1)).isoformat()),
    }
    errors = {}
    with trio.fail_after(10):
        accepted = await call(lambda: jobs.create(start_day=two_ago.isoformat(),
                                                  end_day=two_ago.isoformat(), friendly_name="ok"))
        for why, (start, end) in refused.items():
            with pytest.raises(TwilioRestException) as raised:
                await call(lambda s=start, e=end: jobs.create(start_day=s, end_day=e,
                                                              friendly_name="no"))
            errors[why] = raised.value
    unnamed = await ask(sim, "POST", JOBS, job_form(two_ago, two_ago, name=""))
    assert accepted.end_day == two_ago.isoformat()
    assert {(e.status, e.code) for e in errors.values()} == {(400, 20001)}
    assert "2 days earlier" in errors["yesterday"].msg
    assert unnamed.status == 400 and "FriendlyName" in answer_json(unnamed)["message"]
    assert sim.stats.export_jobs_created == 1 and len(sim.exports.jobs()) == 1


async def test_an_account_asks_for_at_most_366_days_a_utc_day(nursery: trio.Nursery) -> None:
    """Jobs of one UTC day may cover 366 days in all; the one that would pass it is refused."""
    sim = await start_sim(nursery)
    end = TODAY - timedelta(days=2)
    with trio.fail_after(10):
        first = await ask(sim, "POST", JOBS, job_form(end - timedelta(days=299), end))
        second = await ask(sim, "POST", JOBS, job_form(end - timedelta(days=66), end))
        last = await ask(sim, "POST", JOBS, job_form(end - timedelta(days=65), end))
    assert (first.status, second.status, last.status) == (201, 400, 201)
    assert "366 days" in answer_json(second)["message"]


@pytest.mark.deadline(3600)  # virtual seconds: a job's 60 and two links' 240 pass
async def test_a_link_serves_once_and_expires(autojump_clock: trio.abc.Clock) -> None:
    """A day's link serves its file once; a second use, or one past export_link_ttl Trio
    seconds, is answered 403 with no auth asked; each day fetch makes a fresh link."""
    async with open_simulator(KNOBS, base_url="http://sim", deliver=recorder([])) as sim:
        sim.add_message(to=TO, date_created=noon(DAY))
        await completed_day_file(sim, DAY)
        day = f"/v1/Exports/Messages/Days/{DAY}"
        links = [answer_json(await ask(sim, "GET", day))["redirect_to"] for _ in range(2)]
        paths = [link.removeprefix("http://sim") for link in links]
        no_auth = await handle_api(sim, Request("GET", paths[0], {}, b""))
        await trio.sleep(239.9)
        in_time = await handle_api(sim, Request("GET", paths[1], {}, b""))
        late = answer_json(await ask(sim, "GET", day))["redirect_to"].removeprefix("http://sim")
        await trio.sleep(240)
        expired = await ask(sim, "GET", late)
    assert len(set(links)) == 2 and no_auth.status == in_time.status == 200
    assert gzip.decompress(no_auth.body) == gzip.decompress(in_time.body)
    assert expired.status == 403 and b"AccessDenied" in expired.body
    stats = sim.stats
    assert (stats.export_downloads, stats.export_links_refused, stats.export_day_fetches) == (
        3, 1, 4)


async def test_failed_downloads_send_half_the_file_then_drop(nursery: trio.Nursery) -> None:
    """`fail_downloads(1)`: the next download sends its full Content-Length, half the bytes,
    and drops the connection; the link is spent, and a fresh one downloads whole."""
    sim = await start_sim(nursery, export_job_delay=0.0, seed=3)
    for n in range(300):
        sim.add_message(to=f"+1555{n:07d}", body=f"message {n}", date_created=noon(DAY))
    days = exports_client(sim).bulkexports.v1.exports("Messages").days
    with trio.fail_after(10):
        await ask(sim, "POST", JOBS, job_form(DAY, DAY))
        link = (await call(days(DAY.isoformat()).fetch)).redirect_to
        sim.fail_downloads(1)
        with pytest.raises(requests.exceptions.ChunkedEncodingError) as cut:
            await call(lambda: requests.get(link, timeout=5))
        spent = await call(lambda: requests.get(link, timeout=5))
        fresh = (await call(days(DAY.isoformat()).fetch)).redirect_to
        whole = await call(lambda: requests.get(fresh, timeout=5))
    assert "IncompleteRead" in str(cut.value)
    assert spent.status_code == 403 and whole.status_code == 200
    assert len(rows(whole.content)) == 300
    assert whole.headers["Content-Type"] == "application/octet-stream"
    stats = sim.stats
    assert (stats.export_downloads, stats.export_downloads_failed) == (2, 1)


@pytest.mark.deadline(3600)  # virtual seconds: two jobs of 60 pass
async def test_files_mix_in_inbound_rows_and_raw_lines(autojump_clock: trio.abc.Clock) -> None:
    """export_inbound_per_day spreads received texts among the outbound rows; a raw line
    goes last, as given, and gives a file to a day that has no messages."""
    knobs = replace(KNOBS, export_inbound_per_day=3)
    async with open_simulator(knobs, base_url="http://sim", deliver=recorder([])) as sim:
        for n in range(4):
            sim.add_message(to=TO, body=f"m{n}", date_created=noon(DAY) + timedelta(minutes=n))
        sim.add_export_line(DAY.isoformat(), b'{"sid": ')
        sim.add_export_line(QUIET_DAY.isoformat(), b"not json\n")
        data = await completed_day_file(sim, DAY)
        quiet = await completed_day_file(sim, QUIET_DAY)
    *parsed, broken = list(lines(data))
    mixed = [json.loads(line) for line in parsed]
    assert [row["direction"][:3] for row in mixed] == ["out", "inb", "out", "inb", "out", "inb",
                                                      "out"]
    inbound = [row for row in mixed if row["direction"] == "inbound"]
    assert all(row["status"] == "received" and row["to"] == FROM for row in inbound)
    assert all(row["sid"].startswith("SM") and row["from"] != FROM for row in inbound)
    assert all(row["date_sent"].startswith(str(DAY)) for row in inbound)
    assert broken == b'{"sid": '
    assert list(lines(quiet))[-1] == b"not json"
    assert len(list(lines(quiet))) == 4  # three inbound rows and the raw line


async def test_upper_case_statuses_as_the_api_reference_writes_them(
    nursery: trio.Nursery,
) -> None:
    """With export_status_upper, job details say COMPLETED (and SUBMITTED), which the client
    passes through as they are."""
    sim = await start_sim(nursery, export_job_delay=0.0, export_status_upper=True)
    sim.add_message(to=TO, date_created=noon(DAY))
    exports = exports_client(sim).bulkexports.v1.exports
    with trio.fail_after(10):
        job = await call(lambda: exports("Messages").export_custom_jobs.create(
            start_day=QUIET_DAY.isoformat(), end_day=DAY.isoformat(), friendly_name="upper"))
        fetched = await call(exports.jobs(job.job_sid).fetch)
    assert statuses(job.details) == {"SUBMITTED": [str(QUIET_DAY), str(DAY)]}
    assert statuses(fetched.details) == {"COMPLETEDEMPTYRECORDS": [str(QUIET_DAY)],
                                         "COMPLETED": [str(DAY)]}


async def test_days_and_jobs_lists_page_by_next_page_url(nursery: trio.Nursery) -> None:
    """The days list (oldest first) and the jobs list page through `meta.next_page_url`,
    an absolute URL on the simulator, each day and job once."""
    sim = await start_sim(nursery, export_job_delay=0.0)
    days = [DAY - timedelta(days=n) for n in range(5)]
    for day in days:
        sim.add_message(to=TO, date_created=noon(day))
    exports = exports_client(sim).bulkexports.v1.exports("Messages")
    with trio.fail_after(10):
        for day in days:
            await ask(sim, "POST", JOBS, job_form(day, day, name=f"job {day}"))
        before = sim.stats.requests
        listed = await call(lambda: exports.days.list(page_size=2))
        pages = sim.stats.requests - before
        jobs = await call(lambda: exports.export_custom_jobs.list(page_size=3))
        page = await call(lambda: exports.days.page(page_size=2))
    assert [d.day for d in listed] == [str(day) for day in sorted(days)]
    assert [d.friendly_name for d in listed] == [f"job {day}" for day in sorted(days)]
    assert pages == 3  # ceil(5 / 2)
    assert [j.friendly_name for j in jobs] == [f"job {day}" for day in days]
    assert page.next_page_url.startswith(sim.base_url + "/v1/Exports/Messages/Days?")


async def test_export_routes_take_the_api_s_auth_and_refusals(nursery: trio.Nursery) -> None:
    """A wrong token gets 401 20003, a `throttle` burst 429 20429, another resource type
    404, from the export routes as from the Messages API."""
    sim = await start_sim(nursery)
    wrong = client_for(sim, token="wrong")
    wrong.bulkexports.base_url = sim.base_url
    exports = exports_client(sim).bulkexports.v1.exports
    with trio.fail_after(10):
        with pytest.raises(TwilioRestException) as denied:
            await call(wrong.bulkexports.v1.exports.jobs("JS" + "0" * 32).fetch)
        sim.throttle(requests=1)
        with pytest.raises(TwilioException) as throttled:
            await call(lambda: exports("Messages").days.list(page_size=400))
        with pytest.raises(TwilioRestException) as calls:
            await call(exports("Calls").days("2024-05-01").fetch)
        with pytest.raises(TwilioRestException) as missing:
            await call(exports.jobs("JS" + "0" * 32).fetch)
    assert (denied.value.status, denied.value.code) == (401, 20003)
    assert throttled.value.args[1].status_code == 429 and sim.stats.requests_429 == 1
    assert (calls.value.status, missing.value.status) == (404, 404)


async def test_list_lag_hides_recent_messages_from_the_list_only(nursery: trio.Nursery) -> None:
    """With list_lag, the list leaves out messages listed less than that long ago, while a
    fetch shows them at once."""
    sim = await start_sim(nursery, list_lag=600.0)
    now = datetime.now(UTC)
    old = sim.add_message(to=TO, date_sent=now - timedelta(seconds=700))
    recent = sim.add_message(to=TO, date_sent=now - timedelta(seconds=300))
    client = client_for(sim)
    with trio.fail_after(10):
        created = await call(create(client))
        listed = await call(client.messages.list)
        fetched = [await call(client.messages(m.sid).fetch) for m in (recent, created)]
    assert [m.sid for m in listed] == [old.sid]
    assert [m.sid for m in fetched] == [recent.sid, created.sid]


async def test_delayed_redaction_hides_to_once_the_message_is_old(nursery: trio.Nursery) -> None:
    """With redact_to_after, fetch, list and export files end `to` in XXXX once the message
    is that many seconds old; a younger one and every create answer show it whole."""
    sim = await start_sim(nursery, redact_to_after=3600.0, export_job_delay=0.0)
    now = datetime.now(UTC)
    old = sim.add_message(to=TO, date_created=now - timedelta(hours=2))
    young = sim.add_message(to=TO, date_created=now - timedelta(minutes=30))
    exported = sim.add_message(to=TO, date_created=noon(DAY))
    client = exports_client(sim)
    days = client.bulkexports.v1.exports("Messages").days
    with trio.fail_after(10):
        created = await call(create(client))
        fetched = {m.sid: (await call(client.messages(m.sid).fetch)).to
                   for m in (old, young, created)}
        listed = {m.sid: m.to for m in await call(client.messages.list)}
        await ask(sim, "POST", JOBS, job_form(DAY, DAY))
        link = (await call(days(DAY.isoformat()).fetch)).redirect_to
        [row] = rows((await call(lambda: requests.get(link, timeout=5))).content)
    assert created.to == TO
    assert fetched == {old.sid: "+1555867XXXX", young.sid: TO, created.sid: TO}
    assert listed == fetched | {exported.sid: "+1555867XXXX"}
    assert row["sid"] == exported.sid and row["to"] == "+1555867XXXX"
    assert sim.messages[old.sid].to == TO


async def test_a_message_s_file_is_the_utc_day_it_was_sent(autojump_clock: trio.abc.Clock) -> None:
    """A message created late one day and sent after midnight UTC is in the next day's file;
    one never sent is in the file of the day it was created."""
    async with open_simulator(KNOBS, base_url="http://sim", deliver=recorder([])) as sim:
        midnight = datetime.combine(DAY, time(), UTC)
        crossed = sim.add_message(to=TO, date_created=midnight - timedelta(minutes=1),
                                  date_sent=midnight + timedelta(minutes=1))
        unsent = sim.add_message(to=TO, status="failed", date_created=midnight)
        data = await completed_day_file(sim, DAY)
    assert [row["sid"] for row in rows(data)] == [crossed.sid, unsent.sid]


def test_knobs_refuse_negative_delays_and_counts() -> None:
    """A negative lag, delay, link life, redaction age or inbound count is a ValueError."""
    for knob in ("list_lag", "export_job_delay", "export_link_ttl", "redact_to_after",
                 "export_inbound_per_day"):
        with pytest.raises(ValueError):
            SimKnobs(ACCOUNT_SID, "t", **{knob: -1})
