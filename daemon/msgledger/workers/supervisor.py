"""The main process's side of its fronts: starts them on the shared listener, serves their
links, restarts one that dies, and drains them before the journal closes.

Each link is served by one reader (events to the journal, relayed requests to the Quart
app, counters to /metrics), one acker (the journal's answers back, in order) and one health
reporter (whether the store commits, for the front's /healthz). Events
from a front go through the same intake as the main process's own, so the journal batches
them all together. A link holds its own journal client until the front has gone, so the
journal closes only after the last front's last event.

A front is started by `FrontDeps.spawn` (`spawn_front`: a child process), which returns a
`FrontProcess` handle: a test can start fakes instead, on virtual time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Protocol, assert_never

import trio
from hypercorn.typing import ASGIFramework, HTTPScope

from ..drain import drain_when
from ..events import Event, Reply
from ..http.server import Router, serve_admin
from ..http.state import ServerState
from ..journal_client import JournalClient
from ..listeners import Listeners, url_of
from ..logs import get_logger
from ..metrics import Metrics, TallyKey, TallyRefused
from ..settings import Settings
from .link import (
    AcksFrame,
    DrainFrame,
    EventsFrame,
    HealthFrame,
    Link,
    LinkBroken,
    RawFrame,
    ReadyFrame,
    RequestFrame,
    ResponseFrame,
    SettingsFrame,
    TallyFrame,
    decode_to_main,
)
from .relay import call_asgi, open_app

START_TIMEOUT = 60.0  # seconds for a front to import and listen; a slow disk's cold start
ACK_BACKLOG = 64  # batches a link has handed over and not yet acked: backpressure beyond
RELAY_CONCURRENCY = 64  # relayed requests a link runs at once; /v1 is not the hot path
RESTART_BACKOFF = (0.5, 30.0)  # seconds: first and longest wait before restarting a front
STABLE_AFTER = 60.0  # seconds: a front that ran this long starts its backoff afresh
LINK_END_GRACE = 5.0  # seconds a front may outlive its link: enough to log and exit
DRAIN_MARGIN = 5.0  # seconds past graceful_timeout + ack_timeout before a draining front is killed
log = get_logger("msgledger.supervisor")

# The replies of one `events` frame, by the front's ids: their acks are due, in this order.
AcksDue = list[tuple[int, Reply]]


# ------------------------------------------------------------------- the processes


class FrontProcess(Protocol):
    """A started front, as the supervisor handles it."""

    @property
    def pid(self) -> int:
        """For the logs."""
        ...

    async def wait(self) -> int:
        """Its exit code, once it has exited."""
        ...

    def kill(self) -> None:
        """Kill it now; nothing if it has exited already."""
        ...


# Start front `worker` (its number) on its end of the link and the public listener. Both
# sockets are closed once it returns: what it starts keeps copies of its own.
Spawn = Callable[[int, socket.socket, socket.socket], FrontProcess]


def spawn_front(worker: int, link: socket.socket, listener: socket.socket) -> FrontProcess:
    """Start front `worker` as a child process. Popen runs here, in the thread that lives as
    long as the process: a front's parent-death signal is tied to the thread that forked it."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # only the main process speaks to systemd
    fds = (link.fileno(), listener.fileno())
    argv = [sys.executable, "-m", "msgledger", "front", "--worker", str(worker),
            "--link-fd", str(fds[0]), "--listen-fd", str(fds[1]),
            "--parent", str(os.getpid())]
    process = subprocess.Popen(argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
    log.info("front_started", worker=worker, pid=process.pid)
    return ChildFront(process)


@dataclasses.dataclass(frozen=True)
class ChildFront:
    """A front that is a child process of this one."""

    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int:
        pidfd = os.pidfd_open(self.process.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return self.process.wait()

    def kill(self) -> None:
        self.process.kill()  # Popen signals no process it has seen exit


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontDeps:
    settings: Settings
    public_url: str
    listener: socket.socket  # the public one; each front is given it
    router: Router  # answers relayed requests: the main process's router and Quart app
    metrics: Metrics
    state: ServerState  # its store health is told to every front
    spawn: Spawn = spawn_front


# ------------------------------------------------------------------------- the fronts


async def serve_by_fronts(journal: JournalClient, router: Router, listeners: Listeners,
                          settings: Settings, state: ServerState, metrics: Metrics,
                          stop: trio.Event, *,
                          task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Have `http.workers` fronts serve HTTP on the public listener while this process
    answers what they relay with `router`, and serves the admin listener itself if
    there is one; started with the public URL, once all listen.

    Closes `journal` and `router.journal` once the last front has gone."""
    url = url_of(listeners.public)
    state.public_url = state.public_url or url
    deps = FrontDeps(settings=settings, public_url=state.public_url, listener=listeners.public,
                     router=router, metrics=metrics, state=state)
    with router.journal:
        async with open_app(router), trio.open_nursery() as nursery:
            nursery.start_soon(drain_when, stop, state)
            await nursery.start(run_fronts, journal, deps, settings.http_workers, stop)
            if listeners.admin is not None:
                await nursery.start(serve_admin, router.app, listeners.admin, settings,
                                    metrics, stop)
            task_status.started(url)


async def run_fronts(journal: JournalClient, deps: FrontDeps, count: int, stop: trio.Event, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Keep `count` fronts running until `stop`; started once every one of them listens.

    Closes `journal` once the last front has gone and its events are acked.
    """
    with journal, deps.listener:
        async with trio.open_nursery() as fronts:
            fronts.start_soon(_close_on, stop, deps.listener)
            front_ready = [trio.Event() for _ in range(count)]
            for worker, ready in enumerate(front_ready, start=1):
                fronts.start_soon(_keep_front, journal.clone(), deps, worker, stop, ready)
            with trio.fail_after(START_TIMEOUT):
                for ready in front_ready:
                    await _either(ready, stop)  # a stop while starting ends the wait
            task_status.started()


async def _either(first: trio.Event, second: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for event in (first, second):
            nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _close_on(stop: trio.Event, listener: socket.socket) -> None:
    """Once draining, let the kernel refuse new connections rather than queue them."""
    await stop.wait()
    listener.close()


async def _keep_front(journal: JournalClient, deps: FrontDeps, worker: int, stop: trio.Event,
                      ready: trio.Event) -> None:
    """Run front `worker`; restart it with a growing backoff if it dies before `stop`."""
    backoff = RESTART_BACKOFF[0]
    with journal:
        while True:
            started = trio.current_time()
            try:
                code = await _run_front_once(journal, deps, worker, stop, ready)
            except OSError as error:  # no process (EAGAIN, ENOMEM...): try again later
                log.error("front_spawn_failed", worker=worker, error=str(error))
                code = -1
            if stop.is_set():
                if code != 0:
                    log.warning("front_failed_drain", worker=worker, exit_code=code)
                return
            if trio.current_time() - started > STABLE_AFTER:
                backoff = RESTART_BACKOFF[0]
            log.error("front_died", worker=worker, exit_code=code, restart_in_s=backoff)
            with trio.move_on_after(backoff):
                await stop.wait()
                return
            backoff = min(backoff * 2, RESTART_BACKOFF[1])


async def _run_front_once(journal: JournalClient, deps: FrontDeps, worker: int,
                          stop: trio.Event, ready: trio.Event) -> int:
    """One front's life: spawn it, serve its link, drain it on `stop`; its exit code."""
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:  # once spawned, the front holds its own copy
            process = deps.spawn(worker, theirs, deps.listener)
        link, link_ended = Link(ours), trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve_link, link, journal.clone(), deps, worker, ready,
                                   link_ended)
                async with trio.open_nursery() as watching:
                    watching.start_soon(_drain_on, stop, link, process, deps.settings)
                    watching.start_soon(_reap_after, link_ended, process)
                    code = await process.wait()
                    watching.cancel_scope.cancel()
        finally:
            process.kill()  # if cancelled (a second signal): do not leave it behind
    return code


async def _reap_after(link_ended: trio.Event, process: FrontProcess) -> None:
    """A front whose link has ended can make nothing durable: if it has not gone on its own
    shortly after (a drained front closes its link, then exits), kill it, so it is
    restarted instead of answering 503 for ever."""
    await link_ended.wait()
    await trio.sleep(LINK_END_GRACE)
    log.error("front_killed", pid=process.pid, why="its link ended")
    process.kill()


async def _drain_on(stop: trio.Event, link: Link, process: FrontProcess,
                    settings: Settings) -> None:
    """On `stop`, have the front drain; kill it if it outstays its deadline.

    Asked over the link, not by a signal: systemd signals every process of the service,
    and a second signal would tell the front to give up its drain."""
    await stop.wait()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await link.send(DrainFrame())
    await trio.sleep(settings.http_graceful_timeout + settings.http_ack_timeout + DRAIN_MARGIN)
    log.error("front_killed", pid=process.pid, why="did not drain in time")
    process.kill()


# -------------------------------------------------------------------------- the link


async def _serve_link(link: Link, journal: JournalClient, deps: FrontDeps, worker: int,
                      ready: trio.Event, link_ended: trio.Event) -> None:
    """Serve one front's link until the front closes it or breaks it; then set
    `link_ended`."""
    acks_due_in, acks_due_out = trio.open_memory_channel[AcksDue](ACK_BACKLOG)
    with journal:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_acks, link, acks_due_out)
            with acks_due_in:
                server = _LinkServer(link, journal, acks_due_in, deps, nursery, ready)
                try:
                    await link.send(SettingsFrame(deps.settings, deps.public_url,
                                                  deps.router.routes))
                    nursery.start_soon(_send_health, link, deps.state, link_ended)
                    async for frame in link.frames():
                        await server.dispatch(frame)
                except (LinkBroken, trio.BrokenResourceError) as error:
                    log.error("link_broken", worker=worker, error=str(error))
                link_ended.set()


@dataclasses.dataclass
class _LinkServer:
    """What one link's frames act on."""

    link: Link
    journal: JournalClient
    acks_due: trio.MemorySendChannel[AcksDue]
    deps: FrontDeps
    relays: trio.Nursery
    ready: trio.Event
    relaying: trio.Semaphore = dataclasses.field(
        default_factory=lambda: trio.Semaphore(RELAY_CONCURRENCY))
    reported: dict[TallyKey, float] = dataclasses.field(default_factory=dict)

    async def dispatch(self, frame: RawFrame) -> None:
        """Act on one frame. One that is not a frame the main process reads breaks the link
        (LinkBroken); once decoded, an error in acting on it is ours and is raised as is."""
        match decode_to_main(frame):
            case EventsFrame(events):
                await self.acks_due.send(await _enqueue_all(self.journal, events))
            case RequestFrame(ident, scope, body):
                await self.relaying.acquire()  # a front asking too much waits here, not in memory
                self.relays.start_soon(_answer_relayed, self.link, self.deps.router, ident,
                                       scope, body, self.relaying)
            case TallyFrame(totals):
                self._add_tally(totals)
            case ReadyFrame():
                self.ready.set()
            case unexpected:
                assert_never(unexpected)

    def _add_tally(self, totals: list[list[Any]]) -> None:
        try:
            self.deps.metrics.add_tally(totals, self.reported)
        except TallyRefused as refused:  # only Metrics knows its counters and labels
            raise LinkBroken(f"a 'tally' frame naming no counter of ours: {refused}") from None


async def _enqueue_all(journal: JournalClient, events: list[tuple[int, Event]]) -> AcksDue:
    """Give each event to the journal; the replies to wait on, by the front's ids. A full
    intake holds the front back here."""
    return [(ident, await journal.enqueue(event)) for ident, event in events]


async def _send_health(link: Link, state: ServerState, link_ended: trio.Event) -> None:
    """Tell the front whether the store commits and how the poller is: at once (a front
    assumes a store that commits and no poller), then at every change, until the link
    ends."""
    told: HealthFrame | None = None
    while not link_ended.is_set():
        changed = state.health_changed  # before reading: a change while sending is not missed
        now = HealthFrame(state.store_problem, state.poller)
        if now != told:
            told = now
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await link.send(now)
        await _either(changed, link_ended)


async def _send_acks(link: Link, acks_due: trio.MemoryReceiveChannel[AcksDue]) -> None:
    """Answer each batch once the journal has; keep consuming after the front has gone
    (its events are committed all the same)."""
    gone = False
    with acks_due:
        async for due in acks_due:
            acks = AcksFrame([(ident, await reply.wait()) for ident, reply in due])
            if not gone:
                try:
                    await link.send(acks)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    gone = True


async def _answer_relayed(link: Link, app: ASGIFramework, ident: int, scope: HTTPScope,
                          body: bytes, relaying: trio.Semaphore) -> None:
    """Answer one relayed request, then give back its place (taken by `dispatch`)."""
    try:
        answer = await call_asgi(app, scope, body)
    finally:
        relaying.release()
    # If the front has gone, so has the client it asked for.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await link.send(ResponseFrame(ident, answer))
