"""Front processes (`http.workers` > 1): the link's framing, and the fronts as a whole.

Most end-to-end tests run against both ways of serving (the `workers` fixture in
conftest.py); these pin what only fronts do.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from msgledger.events import Event, JournalUnavailable
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
                    await trio.lowlevel.checkpoint()  # let the reader see each piece on its own

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
    (struct.pack("!I", 2) + b"{}", "starts with its name"),
    (struct.pack("!I", 3) + b"[1]", "starts with its name"),
])
async def test_what_is_not_a_frame_breaks_the_link(raw: bytes, why: str) -> None:
    """An oversized length, a frame cut off by the close, or a frame that is not a named
    list: the reader stops trusting the link and says why."""
    with pytest.RaisesGroup(pytest.RaisesExc(LinkBroken, match=why)):
        await received(raw, [])


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
    """With three workers, connections land on fronts 1 to 3, never on the main process,
    and callbacks through any of them are journaled."""
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
            after = await ledger.client.get("/healthz")
    assert big.status_code == 413
    assert after.status_code == 200
