"""A front process: serves HTTP on the listener it inherits, checks webhooks itself, and
sends everything else to the main process over its link.

- `/twilio/*`: the same `WebhookReceiver` as the main process, fed by a local intake whose
  consumer (`Forwarder`) sends each batch of checked events down the link. The reply is
  answered by the main process's ack, so a 200 still means "committed by the journal".
- `/healthz`: answered here, for this process (a load balancer probes each one), and for
  the store, as the main process last reported it (`health` frames).
- everything else (`/v1`, `/metrics`): relayed whole to the main process's Quart app.

Ends on SIGTERM/SIGINT by draining like the main process (stop accepting, finish in-flight
requests, hand over the last events), or at once when the link closes: the main process
is gone, and nothing here can become durable without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hmac
import itertools
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, assert_never, cast

import orjson
import structlog
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, RoutingException, Rule

from .. import logs
from ..deadlines import AckDeadlines
from ..drain import drain_when, watch_signals
from ..events import (
    Ack,
    JournalInbox,
    JournalUnavailable,
    Reply,
    Submission,
    take_waiting,
)
from ..http import openapi
from ..http.connections import ConnectionConfig
from ..http.server import (
    Routes,
    answer_lifespan,
    hypercorn_config,
    public_router,
    serve_http,
)
from ..http.state import ServerState
from ..http.webhooks import (
    ROUTES,
    Refused,
    WebhookReceiver,
    headers_of,
    read_body,
    respond,
    webhook_receiver,
)
from ..journal import INTAKE_BUFFER, MAX_BATCH  # a frame holds what one commit may
from ..journal_client import JournalClient
from ..listeners import fd_bind
from ..metrics import Metrics
from .link import (
    FRAME_BUDGET,
    AcksFrame,
    Answer,
    DrainFrame,
    EventsFrame,
    HealthFrame,
    Link,
    LinkBroken,
    RawFrame,
    ReadyFrame,
    RequestFrame,
    ResponseFrame,
    TallyFrame,
    decode_settings,
    decode_to_front,
    event_to_wire,
)

RELAY_MAX_BODY = 1024 * 1024  # bytes; /v1 bodies are a few KiB, anything near this is abuse
RELAY_TIMEOUT = 60.0  # seconds; a send retried on 429s may take a while, not this long
TALLY_EVERY = 1.0  # seconds between counter reports: /metrics lags by at most this
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
log = logs.get_logger("msgledger.front")


class Forwarder:
    """The front's journal: sends submissions down the link, answers them from its acks."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._ids = itertools.count()
        self._pending: dict[int, Reply] = {}

    async def run(self, inbox: JournalInbox) -> None:
        """Forward every batch the inbox delivers, until it closes. Once the link is broken,
        answer the rest at once: nothing can make them durable."""
        with inbox:
            async for first in inbox:
                for frame in self._frames(take_waiting(inbox, first, MAX_BATCH)):
                    try:
                        await self._link.send_encoded(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.fail_all("main process unavailable")

    def _frames(self, batch: list[Submission]) -> list[bytes]:
        """The batch as `events` frames of at most FRAME_BUDGET bytes each."""
        frames: list[bytes] = []
        encoded: list[bytes] = []
        size = 0
        for submission in batch:
            ident = next(self._ids)
            try:
                data = orjson.dumps(event_to_wire(ident, submission.event))
            except orjson.JSONEncodeError:  # text that is not Unicode: it fails alone
                submission.reply.answer(JournalUnavailable("event cannot be stored"))
                continue
            if len(data) > FRAME_BUDGET:  # far beyond any http.max_body_bytes in use
                submission.reply.answer(JournalUnavailable("event too large to forward"))
                continue
            if size + len(data) > FRAME_BUDGET:
                frames.append(EventsFrame.join(encoded))
                encoded, size = [], 0
            self._pending[ident] = submission.reply
            encoded.append(data)
            size += len(data) + 1
        if encoded:
            frames.append(EventsFrame.join(encoded))
        return frames

    def answer(self, acks: list[tuple[int, Ack]]) -> None:
        for ident, ack in acks:
            reply = self._pending.pop(ident, None)
            if reply is not None:
                reply.answer(ack)

    def fail_all(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            reply.answer(JournalUnavailable(why))


_JSON = [(b"content-type", b"application/json")]
_UNAVAILABLE: Answer = (503, _JSON, b'{"error": "main process unavailable"}')
_TIMED_OUT: Answer = (504, _JSON, b'{"error": "main process did not answer in time"}')


class Relay:
    """ASGI app that has the main process answer a request: the whole request goes down the
    link, the whole answer comes back.

    A `/v1` request (but `GET /v1/openapi.json`, the contract) must carry the API's bearer
    token before its body is even read: an anonymous client cannot make the main process
    take a megabyte from it. Same rule as `api._bearer`: no token configured, no guarded
    `/v1` request is let through.
    """

    def __init__(self, link: Link, api_token: str | None, routes: Routes) -> None:
        self._link = link
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[trio.Event, list[Answer]]] = {}
        self._bearer = f"Bearer {api_token}".encode() if api_token else None
        self._routes = Map([Rule(rule, methods=methods) for rule, methods in routes]).bind("")

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        http_scope = cast(HTTPScope, scope)
        unrouted = self._unrouted(http_scope)
        if unrouted is not None:  # answered here, before any body: the main process's 404/405
            status, reason, allow = unrouted
            await respond(send, status, reason, allow=allow)
            return
        if self._guarded(http_scope["path"]) and not self._authorized(http_scope):
            await respond(send, 401, "missing or wrong bearer token")
            return
        try:  # the webhooks' reader: 413 from Content-Length alone, 400 on a disconnect
            body = await read_body(receive, headers_of(http_scope), RELAY_MAX_BODY)
        except Refused as refused:
            await respond(send, refused.http_status, refused.reason)
            return
        status, headers, answer = await self._ask(http_scope, body)
        await send(cast(Any, {"type": "http.response.start", "status": status,
                              "headers": headers}))
        await send(cast(Any, {"type": "http.response.body", "body": answer}))

    def _unrouted(self, scope: HTTPScope) -> tuple[int, str, str | None] | None:
        """404, or 405 and its Allow, when the main process's app serves no such route or
        method, as it would answer; None to relay (a redirect, too, is the app's to give)."""
        try:
            self._routes.match(scope["path"], scope["method"])
        except NotFound:
            return 404, "no such route", None
        except MethodNotAllowed as refused:
            return 405, "method not allowed", ", ".join(refused.valid_methods or ())
        except RoutingException:
            pass
        return None

    @staticmethod
    def _guarded(path: str) -> bool:
        """A /v1 path that needs the token: all but the contract, as in the Quart app."""
        return openapi.is_api_path(path) and path != openapi.PATH

    def _authorized(self, scope: HTTPScope) -> bool:
        """As `api._bearer` reads it: the first Authorization header, as Quart decodes it."""
        given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        return self._bearer is not None and hmac.compare_digest(
            given.decode("latin-1").encode(), self._bearer)

    async def _ask(self, scope: HTTPScope, body: bytes) -> Answer:
        """The main process's answer; 503 if the link breaks, 504 if it does not come."""
        ident, done, answers = next(self._ids), trio.Event(), list[Answer]()
        self._waiting[ident] = (done, answers)
        try:
            with trio.move_on_after(RELAY_TIMEOUT):
                await self._link.send(RequestFrame(ident, scope, body))
                await done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return _UNAVAILABLE
        finally:
            self._waiting.pop(ident, None)
        if not done.is_set():
            return _TIMED_OUT  # the main process may still act on it, as after any timeout
        return answers[0] if answers else _UNAVAILABLE

    def answer(self, response: ResponseFrame) -> None:
        waiting = self._waiting.get(response.ident)
        if waiting is not None:
            done, answers = waiting
            answers.append(response.answer)
            done.set()

    def fail_all(self) -> None:
        for done, _ in self._waiting.values():
            done.set()  # no answer: the caller gets a 503


async def _send_json(send: ASGISendCallable, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    await send(cast(Any, {"type": "http.response.start", "status": status, "headers": headers}))
    await send(cast(Any, {"type": "http.response.body", "body": body}))


class FrontRouter:
    """Routes a front's requests: webhooks here, /healthz here, the rest to the main process."""

    def __init__(self, webhooks: WebhookReceiver | None, relay: Relay, state: ServerState,
                 worker: int) -> None:
        self._webhooks = webhooks
        self._relay = relay
        self._state = state
        self._worker = worker

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] != "http":
            return  # websockets: nothing here speaks them
        elif self._webhooks is not None and scope["path"] in ROUTES:
            await self._webhooks(scope, receive, send)
        elif scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
            status, body = self._state.health()
            await _send_json(send, status, orjson.dumps({**body, "worker": self._worker}))
        else:
            await self._relay(scope, receive, send)


# ------------------------------------------------------------------------ the process


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the main process dies (Linux), so an orphan
    never keeps accepting on the listener; if it has died already, go now."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl: the link's end still ends us
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


async def run_front(link_fd: int, listen_fd: int, worker: int) -> int:
    """Serve as front number `worker` until a signal drains it (0) or the link to the main
    process breaks (1: the main process is gone, so nothing here can become durable)."""
    link = Link(socket.socket(fileno=link_fd))
    frames = link.frames()
    setup = decode_settings(await anext(frames))
    settings = setup.settings
    logs.configure(settings.log_level)
    structlog.contextvars.bind_contextvars(worker=worker)
    state = ServerState(public_url=setup.public_url)
    forwarder, metrics = Forwarder(link), Metrics()
    relay = Relay(link, settings.api_token, setup.routes)
    deadlines = AckDeadlines(settings.http_ack_timeout)
    intake, inbox = trio.open_memory_channel[Submission](INTAKE_BUFFER)
    journal = JournalClient(intake, deadlines)  # its consumer is the forwarder, not a journal
    receiver = webhook_receiver(settings, journal, state=state, metrics=metrics)
    router = FrontRouter(receiver, relay, state, worker)
    config = hypercorn_config(fd_bind(listen_fd), settings, metrics)
    stop, lost = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, stop, nursery.cancel_scope)
        nursery.start_soon(_read_link, frames, forwarder, relay, state, stop, lost,
                           nursery.cancel_scope)
        nursery.start_soon(deadlines.run)
        nursery.start_soon(_report_tallies, link, metrics)
        async with trio.open_nursery() as serving:
            serving.start_soon(forwarder.run, inbox)
            await serving.start(_serve, public_router(router, settings), config, journal,
                                partial(drain_when, stop, state))
            gc.freeze()  # as the main process: what lives for good is not rescanned
            state.ready = True
            await link.send(ReadyFrame())
            log.info("front_ready", pid=os.getpid())
        await _send_tally(link, metrics.tally())  # every request answered: final
        nursery.cancel_scope.cancel()
    await link.close()
    log.info("front_stopped")
    return 1 if lost.is_set() else 0


async def _serve(app: ASGIFramework, config: ConnectionConfig, journal: JournalClient,
                 shutdown: Callable[[], Awaitable[None]], *,
                 task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP; once the last request has finished, close the journal client (ends the
    forwarder once it has sent what it holds)."""
    with journal:
        await serve_http(app, config, shutdown, task_status=task_status)


async def _read_link(frames: AsyncIterator[RawFrame], forwarder: Forwarder, relay: Relay,
                     state: ServerState, stop: trio.Event, lost: trio.Event,
                     everything: trio.CancelScope) -> None:
    """Dispatch the main process's answers, its word on the store's health, and its drain
    request. The main process never closes a link first, so its end means it is gone, and
    a frame a front does not read means it cannot be trusted: either way fail whoever
    waits (503) and end. Only decoding is checked: an error in acting on a frame is ours."""
    try:
        async for raw in frames:
            match decode_to_front(raw):
                case AcksFrame(acks):
                    forwarder.answer(acks)
                case ResponseFrame() as response:
                    relay.answer(response)
                case HealthFrame(problem, poller):
                    state.report_store(problem)
                    state.report_poller(poller)
                case DrainFrame():
                    stop.set()  # as a first signal: a signal may come too, and drains the same
                case unexpected:
                    assert_never(unexpected)
    except (LinkBroken, trio.BrokenResourceError) as error:
        log.error("link_broken", error=str(error))
    forwarder.fail_all("main process unavailable")
    relay.fail_all()
    log.error("main_process_lost")
    lost.set()
    everything.cancel()


async def _report_tallies(link: Link, metrics: Metrics) -> None:
    """Send this front's counters (webhooks, connections) to the main process, which
    serves /metrics."""
    sent: list[list[Any]] = []
    while True:
        await trio.sleep(TALLY_EVERY)
        totals = metrics.tally()
        if totals != sent:
            await _send_tally(link, totals)
            sent = totals


async def _send_tally(link: Link, totals: list[list[Any]]) -> None:
    """Report `totals`; a broken link is `_read_link`'s to handle."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await link.send(TallyFrame(totals))
