"""The main process's side of its fronts: starts them on the shared listener, serves their
links, restarts one that dies, and drains them before the journal closes.

Each link is served by one reader (events to the journal, relayed requests to the Quart
app, counters to /metrics), one acker (the journal's answers back, in order) and one health
reporter (whether the store commits, for the front's /healthz). Events
from a front go through the same intake as the main process's own, so the journal batches
them all together. A link holds its own journal client until the front has gone, so the
journal closes only after the last front's last event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import trio
from hypercorn.typing import ASGIFramework, HTTPScope

from ..drain import drain_when
from ..events import Reply
from ..http.server import Router, serve_admin
from ..http.state import ServerState
from ..journal_client import JournalClient
from ..listeners import Listeners, url_of
from ..logs import get_logger
from ..metrics import Metrics, TallyKey
from ..settings import Settings
from .link import (
    Frame,
    Link,
    LinkBroken,
    ack_to_wire,
    event_from_wire,
    health_frame,
    scope_from_wire,
    to_bytes,
    to_text,
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

Waiting = list[tuple[int, Reply]]


@dataclasses.dataclass(frozen=True)
class FrontDeps:
    settings: Settings
    public_url: str
    listener: socket.socket  # the public one; each front is given it
    router: Router  # answers relayed requests: the main process's router and Quart app
    metrics: Metrics
    state: ServerState  # its store health is told to every front


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
    deps = FrontDeps(settings, state.public_url, listeners.public, router, metrics, state)
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
            ready = [trio.Event() for _ in range(count)]
            for worker, event in enumerate(ready, start=1):
                fronts.start_soon(_keep_front, journal.clone(), deps, worker, stop, event)
            with trio.fail_after(START_TIMEOUT):
                for event in ready:
                    await _either(event, stop)  # a stop while starting ends the wait
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
        try:
            process = _spawn(worker, theirs.fileno(), deps.listener.fileno())
        finally:
            theirs.close()
        link, link_ended = Link(ours), trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve_link, link, journal.clone(), deps, worker, ready,
                                   link_ended)
                async with trio.open_nursery() as watching:
                    watching.start_soon(_drain_on, stop, link, process, deps.settings)
                    watching.start_soon(_reap_after, link_ended, process)
                    code = await _wait_exit(process)
                    watching.cancel_scope.cancel()
        finally:
            if process.poll() is None:  # cancelled (a second signal): do not leave it behind
                process.kill()
    return code


def _spawn(worker: int, link_fd: int, listen_fd: int) -> subprocess.Popen[bytes]:
    """Start front `worker`. Popen runs here, in the thread that lives as long as the process:
    a front's parent-death signal is tied to the thread that forked it."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # only the main process speaks to systemd
    argv = [sys.executable, "-m", "msgledger", "front", "--worker", str(worker),
            "--link-fd", str(link_fd), "--listen-fd", str(listen_fd),
            "--parent", str(os.getpid())]
    process = subprocess.Popen(argv, pass_fds=(link_fd, listen_fd), env=env,
                               stdin=subprocess.DEVNULL)
    log.info("front_started", worker=worker, pid=process.pid)
    return process


async def _wait_exit(process: subprocess.Popen[bytes]) -> int:
    pidfd = os.pidfd_open(process.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return process.wait()


async def _reap_after(link_ended: trio.Event, process: subprocess.Popen[bytes]) -> None:
    """A front whose link has ended can make nothing durable: if it has not gone on its own
    shortly after (a drained front closes its link, then exits), kill it, so it is
    restarted instead of answering 503 for ever."""
    await link_ended.wait()
    await trio.sleep(LINK_END_GRACE)
    log.error("front_killed", pid=process.pid, why="its link ended")
    process.kill()


async def _drain_on(stop: trio.Event, link: Link, process: subprocess.Popen[bytes],
                    settings: Settings) -> None:
    """On `stop`, have the front drain; kill it if it outstays its deadline.

    Asked over the link, not by a signal: systemd signals every process of the service,
    and a second signal would tell the front to give up its drain."""
    await stop.wait()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await link.send(["drain"])
    await trio.sleep(settings.http_graceful_timeout + settings.http_ack_timeout + DRAIN_MARGIN)
    log.error("front_killed", pid=process.pid, why="did not drain in time")
    process.kill()


# -------------------------------------------------------------------------- the link


async def _serve_link(link: Link, journal: JournalClient, deps: FrontDeps, worker: int,
                      ready: trio.Event, ended: trio.Event) -> None:
    """Serve one front's link until the front closes it or breaks it; then set `ended`."""
    acks, waiting = trio.open_memory_channel[Waiting](ACK_BACKLOG)
    with journal:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_acks, link, waiting)
            with acks:
                served = _LinkServer(link, journal, acks, deps, nursery, ready)
                try:
                    await link.send(["settings", dataclasses.asdict(deps.settings),
                                     deps.public_url, deps.router.routes])
                    nursery.start_soon(_send_health, link, deps.state, ended)
                    async for frame in link.frames():
                        await served.dispatch(frame)
                except (LinkBroken, trio.BrokenResourceError) as error:
                    log.error("link_broken", worker=worker, error=str(error))
                ended.set()


@dataclasses.dataclass
class _LinkServer:
    """What one link's frames act on."""

    link: Link
    journal: JournalClient
    acks: trio.MemorySendChannel[Waiting]
    deps: FrontDeps
    relays: trio.Nursery
    ready: trio.Event
    relaying: trio.Semaphore = dataclasses.field(
        default_factory=lambda: trio.Semaphore(RELAY_CONCURRENCY))
    reported: dict[TallyKey, float] = dataclasses.field(default_factory=dict)

    async def dispatch(self, frame: Frame) -> None:
        """Act on one frame; a frame of the wrong shape breaks the link (LinkBroken)."""
        try:
            await self._dispatch(frame)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise LinkBroken(f"a malformed {frame[0]!r} frame: {error!r}") from error

    async def _dispatch(self, frame: Frame) -> None:
        if frame[0] == "events":
            await self.acks.send(await _hand_over(self.journal, frame[1]))
        elif frame[0] == "request":
            ident, scope, body = frame[1], scope_from_wire(frame[2]), to_bytes(frame[3])
            await self.relaying.acquire()  # a front asking too much waits here, not in memory
            self.relays.start_soon(_relay, self.link, self.deps.router, ident, scope, body,
                                   self.relaying)
        elif frame[0] == "tally":
            self.deps.metrics.add_tally(frame[1], self.reported)
        elif frame[0] == "ready":
            self.ready.set()


async def _hand_over(journal: JournalClient, items: Sequence[list[Any]]) -> Waiting:
    """Give each event to the journal; the replies to wait on, by the front's ids. A full
    intake holds the front back here."""
    return [(ident, await journal.enqueue(event))
            for ident, event in map(event_from_wire, items)]


async def _send_health(link: Link, state: ServerState, ended: trio.Event) -> None:
    """Tell the front whether the store commits: at once if it does not (a front assumes
    it does), then at every change, until the link ends."""
    told: str | None = None
    while not ended.is_set():
        changed = state.store_changed  # before reading: a change while sending is not missed
        if state.store_problem != told:
            told = state.store_problem
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await link.send(health_frame(told))
        await _either(changed, ended)


async def _send_acks(link: Link, batches: trio.MemoryReceiveChannel[Waiting]) -> None:
    """Answer each batch once the journal has; keep consuming after the front has gone
    (its events are committed all the same)."""
    gone = False
    with batches:
        async for waiting in batches:
            wire = [ack_to_wire(ident, await reply.wait()) for ident, reply in waiting]
            if not gone:
                try:
                    await link.send(["acks", wire])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    gone = True


async def _relay(link: Link, app: ASGIFramework, ident: int, scope: HTTPScope, body: bytes,
                 relaying: trio.Semaphore) -> None:
    """Answer one relayed request, then give back its place (taken by `dispatch`)."""
    try:
        status, headers, answer = await call_asgi(app, scope, body)
    finally:
        relaying.release()
    # If the front has gone, so has the client it asked for.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await link.send(["response", ident, status,
                         [[to_text(k), to_text(v)] for k, v in headers], to_text(answer)])
