"""Front processes (`http.workers` > 1): the link's framing, and the fronts as a whole.

Most end-to-end tests run against both ways of serving (the `workers` fixture in
conftest.py); these pin what only fronts do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from msgledger.events import Event, JournalUnavailable, Reply, Submission
from msgledger.metrics import Metrics
from msgledger.workers import front, supervisor
from msgledger.workers import link as wire
from msgledger.workers.link import (
    MAX_FRAME,
    Link,
    LinkBroken,
    ack_from_wire,
    ack_to_wire,
    event_from_wire,
    event_to_wire,
)

from .conftest import (
    API_TOKEN,
    Ledger,
    callback_params,
    daemon_environ,
    new_sid,
    open_ledger,
    wait_until,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
FRAMES = st.lists(st.tuples(st.sampled_from(["events", "acks", "tally"]), JSON), max_size=8)


def encoded(frames: list[list[Any]]) -> bytes:
    """Frames as the link puts them on the wire: a 4-byte length, then JSON."""
    return b"".join(struct.pack("!I", len(data)) + data
                    for data in map(orjson.dumps, frames))


async def received(raw: bytes, cuts: list[int]) -> list[list[Any]]:
    """What a Link reads when `raw` arrives cut at `cuts`, then the writer closes."""
    ours, theirs = socket.socketpair()
    link, frames = Link(ours), []
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            with theirs:
                for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
                    theirs.sendall(raw[start:end])
                    await trio.testing.wait_all_tasks_blocked()  # the reader has taken it

        nursery.start_soon(write)
        frames = [frame async for frame in link.frames()]
    await link.close()
    return frames


@settings(max_examples=50, deadline=None)
@given(frames=FRAMES, data=st.data())
async def test_frames_arrive_whole_however_the_bytes_are_cut(frames: list[tuple[str, Any]],
                                                             data: st.DataObject) -> None:
    """Whatever chunks the stream delivers, the reader yields exactly the frames sent."""
    sent = [[name, value] for name, value in frames]
    raw = encoded(sent)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=6)))
    assert await received(raw, [c for c in cuts if c < len(raw)]) == sent


async def test_a_frame_sent_is_a_frame_received() -> None:
    """`Link.send` and `Link.frames` agree, many senders at once included."""
    left, right = socket.socketpair()
    sender, reader = Link(left), Link(right)
    sent = [["events", [n, "x" * n]] for n in range(200)]
    async with trio.open_nursery() as nursery:
        for frame in sent:
            nursery.start_soon(sender.send, frame)
    await sender.close()
    got = [frame async for frame in reader.frames()]
    await reader.close()
    assert sorted(got, key=lambda f: f[1][0]) == sent


@pytest.mark.parametrize("raw, why", [
    (struct.pack("!I", MAX_FRAME + 1), "over"),
    (struct.pack("!I", 10) + b"[1,", "middle of a frame"),
    (struct.pack("!I", 3) + b"[1,", "not JSON"),
    (struct.pack("!I", 2) + b"{}", "starts with its name"),
    (struct.pack("!I", 3) + b"[1]", "starts with its name"),
])
async def test_what_is_not_a_frame_breaks_the_link(raw: bytes, why: str) -> None:
    """An oversized length, a frame cut off by the close, or a frame that is not a named
    list: the reader stops trusting the link and says why."""
    with pytest.RaisesGroup(pytest.RaisesExc(LinkBroken, match=why)):
        await received(raw, [])


async def test_a_send_cut_short_still_delivers_its_whole_frame(
        autojump_clock: trio.abc.Clock) -> None:
    """A sender cancelled mid-frame (a request cut off by the graceful timeout) finishes
    the frame it started: half a frame would garble every frame after it."""
    left, right = socket.socketpair()
    sender, reader = Link(left), Link(right)
    big = ["response", 1, "x" * (4 * 1024 * 1024)]  # far more than the socket buffers
    got: list[list[Any]] = []

    async def read_later() -> None:
        await trio.sleep(1)  # the send below has been cancelled by now
        got.extend([frame async for frame in reader.frames()])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_later)
        with trio.move_on_after(0.1) as cut:
            await sender.send(big)
        await sender.send(["tally", []])
        await sender.close()
    await reader.close()
    assert cut.cancel_called  # the deadline passed while the frame was half sent
    assert got == [big, ["tally", []]]


async def test_forwarded_batches_stay_under_the_frame_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose events together exceed the frame budget goes as several frames, each
    within it; an event bigger than the budget alone is answered 503, not sent."""
    monkeypatch.setattr(front, "FRAME_BUDGET", 4000)
    left, right = socket.socketpair()
    forwarder, reader = front.Forwarder(Link(left)), Link(right)
    intake, inbox = trio.open_memory_channel[Submission](100)
    replies = [Reply() for _ in range(21)]
    for n, reply in enumerate(replies):  # twenty of about 1 KB, and one of 5 KB
        body = "x" * (5000 if n == 20 else 1000)
        intake.send_nowait(Submission(Event("callback", "callback", "t", sid=f"SM{n}",
                                            data={"params": [["Body", body]]}), reply))
    intake.close()
    await forwarder.run(inbox)
    await forwarder._link.close()
    frames = [frame async for frame in reader.frames()]
    await reader.close()
    sids = [item[4] for frame in frames for item in frame[1]]
    assert sids == [f"SM{n}" for n in range(20)]
    assert len(frames) > 1 and all(len(orjson.dumps(f)) <= 4000 + 64 for f in frames)
    assert isinstance(await replies[20].wait(), JournalUnavailable)


async def test_an_event_that_cannot_be_encoded_fails_alone() -> None:
    """An event carrying text that is not Unicode (a lone surrogate) is answered 503 by the
    front's forwarder; its neighbours go down the link and the front lives on."""
    left, right = socket.socketpair()
    forwarder, reader = front.Forwarder(Link(left)), Link(right)
    intake, inbox = trio.open_memory_channel[Submission](10)
    replies = [Reply() for _ in range(3)]
    for n, reply in enumerate(replies):
        text = "SM\ud800" if n == 1 else f"SM{n}"
        intake.send_nowait(Submission(Event("debugger", "debugger", "t", sid=f"SM{n}",
                                            data={"params": [["Payload", text]]}), reply))
    intake.close()
    with trio.fail_after(10):
        await forwarder.run(inbox)
        await forwarder._link.close()
        frames = [frame async for frame in reader.frames()]
        await reader.close()
        assert isinstance(await replies[1].wait(), JournalUnavailable)
    assert [item[4] for frame in frames for item in frame[1]] == ["SM0", "SM2"]


@pytest.mark.parametrize("frame", [
    ["events", [[1, "callback"]]],  # an event cut short
    ["events", "not a list"],
    ["request", 1],  # no scope, no body
    ["request", 1, {"method": "GET"}, ""],  # a scope without its fields
    ["tally", [["status", "200"]]],  # a total missing
])
async def test_a_malformed_frame_from_a_front_breaks_its_link(frame: list[Any]) -> None:
    """A frame of the wrong shape from a front breaks that link (LinkBroken, so the front is
    replaced), not the main process."""
    intake, _inbox = trio.open_memory_channel[Submission](10)
    acks, _waiting = trio.open_memory_channel[supervisor.Waiting](10)
    deps = cast(supervisor.FrontDeps, SimpleNamespace(metrics=Metrics(), app=None))
    async with trio.open_nursery() as nursery:
        served = supervisor._LinkServer(cast(Link, None), intake, acks, deps, nursery,
                                        trio.Event())
        with pytest.raises(LinkBroken, match="malformed"):
            await served.dispatch(frame)


def test_events_and_acks_cross_unchanged() -> None:
    """An event and its answer (a sequence number or why not) survive the wire format."""
    event = Event("callback", "callback", "2026-11-27T00:00:00.000000+00:00", sid="SM1",
                  ref="r-1", status="delivered",
                  data={"params": [["MessageSid", "SM1"], ["Body", "é ✓"]], "url": "u"})
    assert event_from_wire(orjson.loads(orjson.dumps(event_to_wire(7, event)))) == (7, event)
    assert ack_from_wire(ack_to_wire(3, 42)) == (3, 42)
    ident, ack = ack_from_wire(ack_to_wire(4, JournalUnavailable("disk full")))
    assert (ident, type(ack), str(ack)) == (4, JournalUnavailable, "disk full")


# ------------------------------------------------------------------ the fronts, running


def front_pids() -> set[int]:
    """This test process's children running `msgledger front`."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"front" in argv:
            found.add(int(entry.name))
    return found


async def workers_answering(url: str, want: set[int]) -> set[int]:
    """Open fresh connections until /healthz has named every worker in `want`."""
    seen: set[int] = set()
    while not want <= seen:
        async with httpx.AsyncClient(base_url=url) as client:  # a new connection each time
            seen.add((await client.get("/healthz")).json()["worker"])
    return seen


async def test_every_front_serves_and_the_main_process_does_not(tmp_path: Path) -> None:
    """With three workers, connections land on fronts 1 to 3, never on the main process
    (whose own /healthz would say worker 0), and callbacks through any of them are
    journaled."""
    environ = daemon_environ(tmp_path / "fronts.db", MSGLEDGER_HTTP_WORKERS="3")
    with trio.fail_after(60):
        async with open_ledger(environ) as ledger:
            seen = await workers_answering(ledger.url, {1, 2, 3})
            codes = await post_from_new_connections(ledger, 30)
            records = [await ledger.record(sid) for sid in codes]
    assert seen == {1, 2, 3}
    assert set(codes.values()) == {200}
    assert [r.json()["status"] for r in records] == ["delivered"] * 30


async def post_from_new_connections(ledger: Ledger, count: int) -> dict[str, int]:
    codes = {}
    for _ in range(count):
        async with httpx.AsyncClient(base_url=ledger.url) as client:
            params = callback_params(sid := new_sid(), "delivered")
            fresh = Ledger(ledger.url, ledger.public_url, ledger.store_path, client,
                           ledger.stop, ledger.workers)
            codes[sid] = (await fresh.post_status(params)).status_code
    return codes


async def test_a_dead_front_is_replaced(tmp_path: Path) -> None:
    """A front killed outright is started again; the daemon keeps taking callbacks."""
    environ = daemon_environ(tmp_path / "restart.db", MSGLEDGER_HTTP_WORKERS="2")
    with trio.fail_after(60):
        async with open_ledger(environ) as ledger:
            before = front_pids()
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            # the supervisor's backoff is half a second
            await wait_until(lambda: len(front_pids() - {victim}) == 2)
            after = front_pids()
            await workers_answering(ledger.url, {1, 2})
            codes = await post_from_new_connections(ledger, 10)
    assert len(before) == 2 and victim not in after and len(after) == 2
    assert set(codes.values()) == {200}


async def test_relayed_request_body_is_bounded(tmp_path: Path) -> None:
    """A /v1 body far over any real request is refused by the front (413), and the daemon
    goes on answering."""
    huge = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    environ = daemon_environ(tmp_path / "big.db", MSGLEDGER_HTTP_WORKERS="2")
    with trio.fail_after(30):
        async with open_ledger(environ) as ledger:
            big = await ledger.client.post("/v1/messages/register", content=huge, headers={
                **BEARER, "content-type": "application/json"})
            after = await ledger.client.get("/v1/messages", headers=BEARER)  # crosses the link
    assert big.status_code == 413
    assert (after.status_code, after.json()["messages"]) == (200, [])


async def test_a_front_whose_link_breaks_is_replaced(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When the main process cannot read a front's link (here: a frame over its limit),
    that front is killed and started again instead of answering 503 for ever."""
    monkeypatch.setattr(wire, "MAX_FRAME", 4096)  # the main process runs in this one
    monkeypatch.setattr(supervisor, "LINK_END_GRACE", 0.1)
    environ = daemon_environ(tmp_path / "broken.db", MSGLEDGER_HTTP_WORKERS="2",
                             MSGLEDGER_HTTP_ACK_TIMEOUT="1s")
    with trio.fail_after(60):
        async with open_ledger(environ) as ledger:
            before = front_pids()
            big = callback_params(new_sid(), "sent", Body="x" * 8000)
            with contextlib.suppress(httpx.TransportError):  # killed mid-answer, or a 503
                assert (await ledger.post_status(big)).status_code == 503
            await wait_until(lambda: len(front_pids() - before) == 1 == len(before - front_pids()))
            codes = await post_from_new_connections(ledger, 5)
    assert len(before) == 2
    assert set(codes.values()) == {200}
