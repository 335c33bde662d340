"""Front processes (`http.workers` > 1): the link's framing and its frame kinds, the
supervisor's restarts and drain on fake fronts (virtual time), and the fronts as a whole.

Most end-to-end tests run against both ways of serving (the `workers` fixture in
conftest.py); these pin what only fronts do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import socket
import struct
from collections.abc import Callable
from itertools import pairwise
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

from msgledger import settings as config
from msgledger.deadlines import AckDeadlines
from msgledger.events import Event, JournalUnavailable, Reply, Submission
from msgledger.http.server import Router
from msgledger.http.state import ServerState
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics
from msgledger.settings import Settings
from msgledger.workers import front, supervisor
from msgledger.workers import link as wire
from msgledger.workers.link import (
    MAX_FRAME,
    AcksFrame,
    DrainFrame,
    EventsFrame,
    FrameKind,
    HealthFrame,
    Link,
    LinkBroken,
    RawFrame,
    ReadyFrame,
    RequestFrame,
    ResponseFrame,
    SettingsFrame,
    TallyFrame,
    ack_from_wire,
    ack_to_wire,
    decode_settings,
    decode_to_front,
    decode_to_main,
    event_from_wire,
    event_to_wire,
    scope_from_wire,
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
    with trio.fail_after(10):
        assert await received(raw, [c for c in cuts if c < len(raw)]) == sent


async def test_a_frame_sent_is_a_frame_received() -> None:
    """`Link.send` and `Link.frames` agree, many senders at once included."""
    left, right = socket.socketpair()
    sender, reader = Link(left), Link(right)
    sent = [HealthFrame("x" * n, "running") for n in range(200)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for frame in sent:
                nursery.start_soon(sender.send, frame)
        await sender.close()
        got = [decode_to_front(frame) async for frame in reader.frames()]
        await reader.close()
    assert sorted(got, key=lambda f: len(cast(HealthFrame, f).problem or "")) == sent


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
    with trio.fail_after(10), pytest.RaisesGroup(pytest.RaisesExc(LinkBroken, match=why)):
        await received(raw, [])


async def test_a_send_cut_short_still_delivers_its_whole_frame(
        autojump_clock: trio.abc.Clock) -> None:
    """A sender cancelled mid-frame (a request cut off by the graceful timeout) finishes
    the frame it started: half a frame would garble every frame after it."""
    left, right = socket.socketpair()
    sender, reader = Link(left), Link(right)
    big = ResponseFrame(1, (200, [], b"x" * (4 * 1024 * 1024)))  # far more than the socket buffers
    got: list[RawFrame] = []

    async def read_later() -> None:
        await trio.sleep(1)  # the send below has been cancelled by now
        got.extend([frame async for frame in reader.frames()])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_later)
            with trio.move_on_after(0.1) as cut:
                await sender.send(big)
            await sender.send(TallyFrame([]))
            await sender.close()
        await reader.close()
    assert cut.cancel_called  # the deadline passed while the frame was half sent
    assert got == [big.to_wire(), TallyFrame([]).to_wire()]


def events_in(frames: list[RawFrame]) -> list[Event]:
    """The events that `events` frames carry, in order."""
    decoded = [decode_to_main(frame) for frame in frames]
    assert all(isinstance(frame, EventsFrame) for frame in decoded)
    return [event for frame in cast(list[EventsFrame], decoded) for _, event in frame.events]


async def test_forwarded_batches_stay_under_the_frame_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose events together exceed the frame budget goes as several frames, each
    within it; an event bigger than the budget alone is answered 503, not sent."""
    monkeypatch.setattr(front, "FRAME_BUDGET", 4000)
    left, right = socket.socketpair()
    sender, reader = Link(left), Link(right)
    intake, inbox = trio.open_memory_channel[Submission](100)
    replies = [Reply() for _ in range(21)]
    for n, reply in enumerate(replies):  # twenty of about 1 KB, and one of 5 KB
        body = "x" * (5000 if n == 20 else 1000)
        intake.send_nowait(Submission(Event("callback", "callback", "t", sid=f"SM{n}",
                                            data={"params": [["Body", body]]}), reply))
    intake.close()
    with trio.fail_after(10):
        await front.Forwarder(sender).run(inbox)
        await sender.close()
        frames = [frame async for frame in reader.frames()]
        await reader.close()
        assert isinstance(await replies[20].wait(), JournalUnavailable)
    assert [event.sid for event in events_in(frames)] == [f"SM{n}" for n in range(20)]
    assert len(frames) > 1 and all(len(orjson.dumps(f)) <= 4000 + 64 for f in frames)


async def test_an_event_that_cannot_be_encoded_fails_alone() -> None:
    """An event carrying text that is not Unicode (a lone surrogate) is answered 503 by the
    front's forwarder; its neighbours go down the link and the front lives on."""
    left, right = socket.socketpair()
    sender, reader = Link(left), Link(right)
    intake, inbox = trio.open_memory_channel[Submission](10)
    replies = [Reply() for _ in range(3)]
    for n, reply in enumerate(replies):
        text = "SM\ud800" if n == 1 else f"SM{n}"
        intake.send_nowait(Submission(Event("debugger", "debugger", "t", sid=f"SM{n}",
                                            data={"params": [["Payload", text]]}), reply))
    intake.close()
    with trio.fail_after(10):
        await front.Forwarder(sender).run(inbox)
        await sender.close()
        frames = [frame async for frame in reader.frames()]
        await reader.close()
        assert isinstance(await replies[1].wait(), JournalUnavailable)
    assert [event.sid for event in events_in(frames)] == ["SM0", "SM2"]


# ------------------------------------------------------------------- the frame kinds

EVENT = Event("callback", "callback", "2026-11-27T00:00:00.000000+00:00", sid="SM1",
              ref="r-1", status="delivered",
              data={"params": [["MessageSid", "SM1"], ["Body", "é ✓"]], "url": "u"})


@pytest.fixture
def loaded(tmp_path: Path) -> Settings:
    """Settings as the daemon loads them, with a few set away from their defaults."""
    return config.load(environ=daemon_environ(
        tmp_path / "link.db", MSGLEDGER_HTTP_WORKERS="2", MSGLEDGER_HTTP_GRACEFUL_TIMEOUT="7s",
        MSGLEDGER_HTTP_ACK_TIMEOUT="2s", MSGLEDGER_HTTP_TRUSTED_PROXIES="10.0.0.0/8"))


def one_of_each(settings: Settings) -> list[tuple[Any, Callable[[RawFrame], Any]]]:
    """A frame of every kind but `events` (sent pre-encoded), and how its reader decodes it."""
    scope = scope_from_wire({
        "method": "POST", "path": "/v1/messages", "raw_path": "/v1//messages",
        "query_string": "a=1&b=\xff", "scheme": "http", "http_version": "1.1",
        "client": ["10.0.0.7", 5000], "server": ["127.0.0.1", 8080],
        "headers": [["authorization", "Bearer t"], ["x-raw", "\x00\xff"]]})
    return [
        (SettingsFrame(settings, "https://ledger.example.com/l", [("/v1/messages", ["GET"])]),
         decode_settings),
        (ReadyFrame(), decode_to_main),
        (AcksFrame([(1, 42), (2, JournalUnavailable("disk full"))]), decode_to_front),
        (RequestFrame(3, scope, b"\x00body\xff"), decode_to_main),
        (ResponseFrame(3, (201, [(b"content-type", b"application/json")], b"{}\xff")),
         decode_to_front),
        (TallyFrame([["callbacks", {"route": "status", "outcome": "ok"}, 3.0]]), decode_to_main),
        (HealthFrame("disk full", "running"), decode_to_front),
        (HealthFrame(None, "paused: refused"), decode_to_front),
        (DrainFrame(), decode_to_front),
    ]


def test_every_kind_crosses_unchanged(loaded: Settings) -> None:
    """Each kind's frame, through JSON and back, is the frame sent: its reader decodes it
    to the same kind with the same content."""
    samples = one_of_each(loaded)
    for sent, decode in samples:
        wire_form = sent.to_wire()
        got = decode(orjson.loads(orjson.dumps(wire_form)))
        assert type(got) is type(sent) and got.to_wire() == wire_form
    settings_frame = decode_settings(orjson.loads(orjson.dumps(samples[0][0].to_wire())))
    assert settings_frame.settings == loaded  # every field, the tuple of proxies included
    raw = EventsFrame.join([orjson.dumps(event_to_wire(n, EVENT)) for n in (7, 8)])
    assert decode_to_main(orjson.loads(raw)) == EventsFrame([(7, EVENT), (8, EVENT)])
    assert {type(sent).KIND for sent, _ in samples} | {EventsFrame.KIND} == set(FrameKind)


def test_events_and_acks_cross_unchanged() -> None:
    """An event and its answer (a sequence number or why not) survive the wire format."""
    assert event_from_wire(orjson.loads(orjson.dumps(event_to_wire(7, EVENT)))) == (7, EVENT)
    assert ack_from_wire(ack_to_wire(3, 42)) == (3, 42)
    ident, ack = ack_from_wire(ack_to_wire(4, JournalUnavailable("disk full")))
    assert (ident, type(ack), str(ack)) == (4, JournalUnavailable, "disk full")


@pytest.mark.parametrize("decode, frame", [
    (decode_to_main, ["bogus"]),
    (decode_to_main, ["acks", []]),  # the main process's own kind, come back
    (decode_to_main, ["settings", {}, "", []]),
    (decode_to_front, ["bogus", 1]),
    (decode_to_front, ["events", []]),  # a front's own kind, come back
    (decode_to_front, ["settings", {}, "", []]),  # only ever the first frame
])
def test_a_kind_its_reader_does_not_read_breaks_the_link(
        decode: Callable[[RawFrame], Any], frame: RawFrame) -> None:
    """On either side, a frame of a kind that side does not read is not skipped: the other
    end is not speaking this protocol, and the link is broken."""
    with pytest.raises(LinkBroken, match="unknown"):
        decode(frame)


def test_a_front_reads_the_settings_first() -> None:
    with pytest.raises(LinkBroken, match="before the settings"):
        decode_settings(["drain"])


@pytest.mark.parametrize("decode, frame", [
    (decode_to_main, ["ready", 1]),
    (decode_to_main, ["events", [[1, "callback"]]]),  # an event cut short
    (decode_to_main, ["events", "not a list"]),
    (decode_to_main, ["request", 1]),  # no scope, no body
    (decode_to_main, ["request", 1, {"method": "GET"}, ""]),  # a scope without its fields
    (decode_to_main, ["request", 1, {"method": "GET", "path": "/", "raw_path": 5,
                                     "query_string": "", "scheme": "http",
                                     "http_version": "1.1", "client": None, "server": None,
                                     "headers": []}, ""]),  # a raw path that is not text
    (decode_to_main, ["tally", [["callbacks", "200"]]]),  # a total missing
    (decode_to_main, ["tally", [["callbacks", {"route": 1}, 2]]]),  # a label not text
    (decode_to_main, ["tally", [["callbacks", {}, "2"]]]),  # a total not a number
    (decode_to_front, ["acks", [["1", 2, None]]]),  # an id that is not one
    (decode_to_front, ["acks", [[1, "two", None]]]),
    (decode_to_front, ["response", 1, "200", [], ""]),
    (decode_to_front, ["response", 1, 200, [["k", 5]], ""]),
    (decode_to_front, ["response", 1, 200, [], "\u0100"]),  # not a byte
    (decode_to_front, ["health", 5]),
    (decode_to_front, ["drain", "now"]),
    (decode_settings, ["settings", {"http_workers": 2}, "u", []]),
])
def test_a_malformed_frame_breaks_the_link(decode: Callable[[RawFrame], Any],
                                           frame: RawFrame) -> None:
    """A frame of the wrong shape, from either side, breaks the link, named by its kind."""
    with pytest.raises(LinkBroken, match=f"malformed '{frame[0]}' frame"):
        decode(frame)


def link_server(nursery: trio.Nursery, journal: object = None) -> supervisor._LinkServer:
    """A link's server in the main process, as it reads a front's frames."""
    acks_due, _ = trio.open_memory_channel[supervisor.AcksDue](10)
    deps = cast(supervisor.FrontDeps, SimpleNamespace(metrics=Metrics()))
    return supervisor._LinkServer(cast(Link, None), cast(JournalClient, journal), acks_due,
                                  deps, nursery, trio.Event())


@pytest.mark.parametrize("frame, why", [
    (["bogus"], "unknown"),
    (["events", [[1, "callback"]]], "malformed"),
    (["tally", [["no_such_counter", {}, 1]]], "no counter of ours"),
    (["tally", [["callbacks", {"no_such_label": "x"}, 1]]], "no counter of ours"),
])
async def test_what_a_front_must_not_send_breaks_its_link(frame: RawFrame, why: str) -> None:
    """A frame from a front that the main process cannot take breaks that link (LinkBroken,
    so the front is replaced), not the main process."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with pytest.raises(LinkBroken, match=why):
                await link_server(nursery).dispatch(frame)


async def test_an_error_in_acting_on_a_frame_is_not_called_a_malformed_frame() -> None:
    """Only decoding is checked for the front's mistakes: once a frame has decoded, an
    error in the main process's own handling is raised as itself, even of a type a decoder
    raises, instead of being blamed on the front as a malformed frame."""

    class Buggy:
        async def enqueue(self, event: Event) -> Reply:
            raise KeyError("our own bug")

    frame = orjson.loads(EventsFrame.join([orjson.dumps(event_to_wire(1, EVENT))]))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with pytest.raises(KeyError, match="our own bug"):
                await link_server(nursery, Buggy()).dispatch(frame)


async def test_a_front_sent_a_kind_it_does_not_read_gives_up_its_link(
        loaded: Settings) -> None:
    """The front's side, in this process: a frame of a kind a front does not read breaks its
    link as the link's end would. The front stops with 1 instead of skipping the frame."""
    ours, theirs = socket.socketpair()
    listener = socket.create_server(("127.0.0.1", 0))
    link, exit_codes = Link(ours), list[int]()

    async def run_front() -> None:
        exit_codes.append(await front.run_front(theirs.detach(), listener.detach(), 1))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_front)
            await link.send(SettingsFrame(loaded, "http://127.0.0.1:1", []))
            frames = link.frames()
            assert isinstance(decode_to_main(await anext(frames)), ReadyFrame)
            await link.send_encoded(b'["events",[]]')
        await link.close()
    assert exit_codes == [1]


# ---------------------------------------------------- the supervisor, on fake fronts


@dataclasses.dataclass
class FakeFront:
    """A front as the supervisor handles it (`supervisor.FrontProcess`), wholly on virtual
    time: a Trio task on the other end of the link. It reads its settings, says it is ready
    and sends `says`; then it exits with `code` once it has lived `lives` seconds, or with 0
    when told to drain, unless it `ignores_drain`. Exiting closes its end of the link, as a
    process's exit does."""

    lives: float = math.inf
    code: int = 1
    ignores_drain: bool = False
    says: list[bytes] = dataclasses.field(default_factory=list)
    pid: int = 0
    born: float = math.nan
    died: float = math.nan
    killed: float | None = None
    exit_code: int | None = None
    exited: trio.Event = dataclasses.field(default_factory=trio.Event)

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def kill(self) -> None:
        if not self.exited.is_set():
            self.killed = trio.current_time()
            self._exit(-9)

    def _exit(self, code: int) -> None:
        if not self.exited.is_set():  # a process exits once
            self.exit_code, self.died = code, trio.current_time()
            self.exited.set()

    async def run(self, link: Link) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._behave, link)
            await self.exited.wait()
            nursery.cancel_scope.cancel()
        await link.close()

    async def _behave(self, link: Link) -> None:
        frames = link.frames()
        decode_settings(await anext(frames))
        await link.send(ReadyFrame())
        for data in self.says:
            await link.send_encoded(data)
        with trio.move_on_after(self.lives):
            async for frame in frames:
                if isinstance(decode_to_front(frame), DrainFrame) and not self.ignores_drain:
                    self._exit(0)
                    return
        self._exit(self.code)


class FakeSpawn:
    """`FrontDeps.spawn` that starts each of `fronts` in turn, in `nursery`; spawning one
    more than planned fails the test."""

    def __init__(self, nursery: trio.Nursery, fronts: list[FakeFront]) -> None:
        self._nursery, self._planned, self._left = nursery, iter(fronts), len(fronts)
        self.all_started = trio.Event()

    def __call__(self, worker: int, link: socket.socket, listener: socket.socket) -> FakeFront:
        started = next(self._planned)
        started.born = trio.current_time()
        self._nursery.start_soon(started.run, Link(link.dup()))  # the caller closes `link`
        self._left -= 1
        if not self._left:
            self.all_started.set()
        return started


async def supervise(fronts: list[FakeFront], settings: Settings) -> None:
    """Run one front's place under the real supervisor, started as `fronts` in turn, until
    the last has started; then stop, and wait for the drain to end."""
    intake, _inbox = trio.open_memory_channel[Submission](1)
    journal = JournalClient(intake, AckDeadlines(settings.http_ack_timeout))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        spawn = FakeSpawn(nursery, fronts)
        deps = supervisor.FrontDeps(
            settings=settings, public_url="http://127.0.0.1:1", listener=socket.socket(),
            router=cast(Router, SimpleNamespace(routes=[])), metrics=Metrics(),
            state=ServerState(), spawn=spawn)
        await nursery.start(supervisor.run_fronts, journal, deps, 1, stop)
        await spawn.all_started.wait()
        stop.set()


def restart_gaps(fronts: list[FakeFront]) -> list[float]:
    """Seconds from each front's death to the start of the next."""
    return [later.born - earlier.died for earlier, later in pairwise(fronts)]


async def test_a_dying_front_is_restarted_after_a_doubling_backoff(
        autojump_clock: trio.abc.Clock, loaded: Settings) -> None:
    """A front that dies at once, again and again, is restarted after 0.5 s, then 1, 2...
    and never more than 30 s after (RESTART_BACKOFF)."""
    fronts = [*(FakeFront(lives=0) for _ in range(8)), FakeFront()]
    with trio.fail_after(100):
        await supervise(fronts, loaded)
    assert supervisor.RESTART_BACKOFF == (0.5, 30.0)
    assert restart_gaps(fronts) == pytest.approx([0.5, 1, 2, 4, 8, 16, 30, 30])
    assert [f.exit_code for f in fronts] == [1] * 8 + [0]


@pytest.mark.parametrize("lived, gaps", [
    (supervisor.STABLE_AFTER + 1, [0.5, 1, 0.5, 1]),  # stable: the backoff starts afresh
    (supervisor.STABLE_AFTER - 1, [0.5, 1, 2, 4]),
])
async def test_a_front_that_ran_stably_restarts_its_backoff(
        autojump_clock: trio.abc.Clock, loaded: Settings, lived: float,
        gaps: list[float]) -> None:
    """A front that dies after STABLE_AFTER seconds of running is restarted after the first
    backoff again, not the next one."""
    fronts = [FakeFront(lives=0), FakeFront(lives=0), FakeFront(lives=lived),
              FakeFront(lives=0), FakeFront()]
    with trio.fail_after(100):
        await supervise(fronts, loaded)
    assert restart_gaps(fronts) == pytest.approx(gaps)


@pytest.mark.parametrize("ignores_drain", [True, False])
async def test_a_front_that_does_not_drain_in_time_is_killed(
        autojump_clock: trio.abc.Clock, loaded: Settings, ignores_drain: bool) -> None:
    """On stop, a front is told to drain over its link. One that has not exited
    graceful_timeout + ack_timeout + DRAIN_MARGIN later is killed, and not restarted; one
    that drains is left to exit."""
    fronts = [FakeFront(ignores_drain=ignores_drain)]
    with trio.fail_after(100):
        await supervise(fronts, loaded)
    stopped, deadline = fronts[0].born, 7 + 2 + supervisor.DRAIN_MARGIN  # no time to start
    if ignores_drain:
        assert (fronts[0].killed, fronts[0].exit_code) == (pytest.approx(stopped + deadline), -9)
    else:
        assert (fronts[0].killed, fronts[0].died, fronts[0].exit_code) == (None, stopped, 0)


async def test_a_front_sending_an_unknown_kind_is_replaced(
        autojump_clock: trio.abc.Clock, loaded: Settings) -> None:
    """The main process's side: a frame of a kind it does not read breaks that front's link;
    the front is killed LINK_END_GRACE later, and restarted after the first backoff."""
    fronts = [FakeFront(says=[b'["bogus"]']), FakeFront()]
    with trio.fail_after(100):
        await supervise(fronts, loaded)
    assert fronts[0].killed == pytest.approx(fronts[0].born + supervisor.LINK_END_GRACE)
    assert restart_gaps(fronts) == pytest.approx([supervisor.RESTART_BACKOFF[0]])


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
