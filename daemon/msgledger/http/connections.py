"""The connection layer: hypercorn's per-connection classes, with what msgledger needs of
them and hypercorn has no setting for. `install()` points hypercorn at them; `serve_http`
calls it. Each workaround, its upstream cause and when it can go: docs/hypercorn.md.

- **One connection's failure stays that connection's.** Whatever escapes one connection
  (an ExceptionGroup from its TaskGroup) is logged as one `connection_failed` line and
  counted; the server, and every other connection, carries on. hypercorn lets it escape
  into its server nursery, which ends the process.
- **HTTP/1.1 only.** HTTP/2 with prior knowledge (the `PRI * HTTP/2.0` preface) is
  answered with a GOAWAY(HTTP_1_1_REQUIRED) and closed; `Upgrade: h2c` is ignored and the
  request served as HTTP/1.1 (RFC 9110 §7.8 lets a server ignore Upgrade). Twilio and our
  proxies speak HTTP/1.1, and hypercorn's HTTP/2 stack is where the crashes were.
- **A request body has `http.read_timeout` to arrive in full**, counted from its headers,
  whatever the route; then the connection is closed. hypercorn's own `read_timeout`
  bounds each read instead: it restarts on every byte and would cut idle keep-alive
  connections too.
- **A connection ends with its client.** Once the client has closed its side (or the read
  failed), nothing more can arrive, so the keep-alive timer is stopped and never restarted:
  the connection closes as soon as its last answer is sent. hypercorn waits out the timer
  (75 s) instead whenever the request's task finished before the client hung up, which on
  the lean webhook path is nearly every time.
- **A drain drops no request.** Idle connections are kept DRAIN_GRACE once draining, and
  whatever arrives on them is answered with `Connection: close`; hypercorn closed them at
  once, racing the proxies' pooled requests (502s) and connections accepted but unread.
  An answer that promised keep-alive keeps it, even if the drain began while it was sent.
- **Closing does not race an answer.** hypercorn half-closes (`send_eof`) without its
  send lock; an answer sent at that moment failed with BusyResourceError and a traceback.

The classes are hypercorn 0.18's own with the fewest methods overridden; they lean on its
internals, hence the pin in pyproject.toml. The hot path is unchanged but for one saving:
a read that no request body waits on runs without a cancel scope.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h11
import hypercorn.protocol
import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from ..logs import get_logger
from ..metrics import Metrics

CLOSE_TIMEOUT = 5.0  # seconds a shielded close may take; it is local work, not the client's
# Seconds an idle connection is kept once the server drains: a request sent on it meanwhile
# (a proxy's pooled connection, or one accepted just before the drain) is answered, with
# `Connection: close`, instead of meeting a close it could not see coming (a 502 at the
# proxy, which does not retry a POST). Idle connections that stay idle close after it.
DRAIN_GRACE = 0.5
MESSAGE_CHARS = 200  # of an error's text in its log line: enough to tell one from another
log = get_logger("msgledger.connections")


class ConnectionConfig(Config):
    """hypercorn's Config plus what the connection layer needs (`hypercorn_config`)."""

    def __init__(self, metrics: Metrics, body_timeout: float) -> None:
        super().__init__()
        self.metrics = metrics  # counts what a connection ends with early
        self.body_timeout = body_timeout  # seconds from a request's headers to its last byte


def _http11_required() -> bytes:
    """What a server sends to refuse HTTP/2: its SETTINGS preface, then the GOAWAY."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    connection.initiate_connection()
    connection.close_connection(error_code=h2.errors.ErrorCodes.HTTP_1_1_REQUIRED)
    return connection.data_to_send()


HTTP11_REQUIRED = _http11_required()


class HTTP11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol with its two ways into HTTP/2 closed, which notes when
    each request's headers arrived."""

    headers_at = math.inf  # trio time of the latest request's headers

    async def handle(self, event: Event) -> None:
        try:
            await super().handle(event)
        except H2ProtocolAssumedError:  # where hypercorn's ProtocolWrapper would switch
            await self._refuse_http2()

    async def _check_protocol(self, event: h11.Request) -> None:
        """Called once per request, as its headers arrive. hypercorn's own answers
        `Upgrade: h2c` with 101 and switches to HTTP/2: here the header is ignored, and the
        HTTP/2 preface goes on to `handle`, which refuses it."""
        self.headers_at = trio.current_time()
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            raise H2ProtocolAssumedError(b"")

    async def stream_send(self, event: StreamEvent) -> None:
        """hypercorn's, with `Connection: close` on every answer that the connection's end
        follows, so a client stops reusing the connection before it is closed under it:
        once the server drains, and when the answer leaves before the request's body has
        all been read (a refusal before the body: `_maybe_recycle` must then close, as the
        rest of the body would be read as the next request). Without the header a client
        sent its next request on the closing connection: "disconnected without a response"
        (docs/hypercorn.md §8)."""
        if (isinstance(event, Response) and event.status_code >= 200
                and (self.context.terminated.is_set() or self.reading_body())):
            event = dataclasses.replace(event, headers=[*event.headers,
                                                        (b"connection", b"close")])
        await super().stream_send(event)

    async def _maybe_recycle(self) -> None:
        """hypercorn's, but an answer that promised keep-alive (sent without `Connection:
        close`, so before the drain began) keeps its promise even if the drain began while
        it was being sent: the connection goes idle for the next request, which the drain's
        grace serves with `Connection: close`. hypercorn closed it, under a request the
        proxy had already sent on the strength of that promise (a 502), and its read loop
        then waited for good on a request it would never read (docs/hypercorn.md §7)."""
        await self._close_stream()
        if self.connection.our_state is h11.DONE and self.connection.their_state is h11.DONE:
            try:
                self.connection.start_next_cycle()
            except h11.LocalProtocolError:
                await self.send(Closed())
            else:
                await self.can_read.set()
                await self.send(Updated(idle=True))
        else:
            await self.can_read.set()
            await self.send(Closed())

    def reading_body(self) -> bool:
        """A request's headers have arrived and the last byte of its body has not."""
        return self.connection.their_state is h11.SEND_BODY

    async def _refuse_http2(self) -> None:
        log.warning("connection_refused", reason="http2", client=_address(self.client))
        _count(self.config, "http2_refused")
        await self.send(RawData(data=HTTP11_REQUIRED))
        await self.send(Closed())


class MsgledgerTCPServer(TCPServer):
    """hypercorn's TCP connection, kept from taking the server down with it, with a
    deadline on each request body and a close that races no answer."""

    read_ended = False  # the client can send nothing more: EOF, a reset, or a body deadline

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as failure:  # trio.Cancelled is a BaseException: it goes on
            error = _first(failure)
            log.error("connection_failed", error=type(error).__name__,
                      message=str(error)[:MESSAGE_CHARS], client=self._client())
            _count(self.config, "failed")

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's, with the close shielded (and bounded) as its writes already are.
        hypercorn closes a connection from inside the app's own last `send` when the
        request body has not all arrived (an answer given early: 401, 404, 405, 413). In
        that same call it tells the app the stream is closed, and quart-trio cancels the
        request's tasks on hearing it: the task running the close. The close was cut off
        at its first checkpoint and the socket stayed open, unread and unanswered, for good
        (docs/hypercorn.md: "An early answer wedges the connection")."""
        if isinstance(event, Updated) and event.idle and self.read_ended:
            return  # no keep-alive timer: no request can come, so close once answered
        if not isinstance(event, Closed):
            await super().protocol_send(event)
            return
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
            await super().protocol_send(event)
        if scope.cancelled_caught:  # whatever held the close up, the descriptor goes
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _read_data(self) -> None:
        """hypercorn's read loop, but bounded by the body deadline instead of a timeout per
        read (its `config.read_timeout` stays None), and ending the keep-alive wait with
        the client."""
        while True:
            try:
                data = await self._receive()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if data is None:
                await self._drop_slow_body()
                break
            await self.protocol.handle(RawData(data))
            if data == b"":
                break
        self.read_ended = True
        await self.protocol.handle(Closed())
        # The keep-alive timer is the only task left once the last answer is out: without
        # it, `run`'s task group ends and the socket is closed (docs/hypercorn.md §6).
        await self.idle_task.stop()

    async def _receive(self) -> bytes | None:
        """The next bytes from the client; None if the request body's deadline came first."""
        deadline = self._body_deadline()
        if deadline == math.inf:  # between requests: hypercorn's keep-alive timer runs
            return bytes(await self.stream.receive_some(MAX_RECV))
        with trio.move_on_at(deadline):
            return bytes(await self.stream.receive_some(MAX_RECV))
        return None

    def _body_deadline(self) -> float:
        protocol, config = self.protocol.protocol, self.config
        if (isinstance(config, ConnectionConfig) and isinstance(protocol, HTTP11Protocol)
                and protocol.reading_body()):
            return protocol.headers_at + config.body_timeout
        return math.inf

    async def _drop_slow_body(self) -> None:
        """Close at once, without an answer: the socket is released even if the request's
        handler is slow to notice (it sees `http.disconnect` next)."""
        log.warning("body_timed_out", client=self._client(),
                    after_s=getattr(self.config, "body_timeout", None))
        _count(self.config, "body_timeout")
        await self.stream.aclose()

    async def _close(self) -> None:
        """hypercorn's close, but its half-close (`send_eof`) only while no answer is being
        sent: send_eof holds the stream's send side across a checkpoint, and an answer
        sent meanwhile failed with BusyResourceError. A send under way is ended by
        `aclose` (ClosedResourceError, which `protocol_send` expects); one that starts
        during send_eof waits for the lock."""
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            pass  # an answer is being sent: aclose alone ends it
        else:
            try:
                await self.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client has gone, or the stream is closed already
            finally:
                self.send_lock.release()
        await self.stream.aclose()

    async def _idle_timeout(self) -> None:
        """hypercorn's keep-alive timer, which also closes idle connections once the server
        drains; but never a connection with a request in flight, and an idle one only after
        DRAIN_GRACE, during which a request that arrives is served (and answered with
        `Connection: close`: `HTTP11Protocol.stream_send`). hypercorn closed at once: a
        proxy's pooled request sent at that moment got a 502, a connection accepted but not
        yet read was dropped unanswered, and a request whose headers arrived as the timer
        woke was cut off (its stop came too late to cancel a close already shielded). A
        request's end closes its connection once draining (`_maybe_recycle`)."""
        with trio.move_on_after(self.config.keep_alive_timeout):
            await self.context.terminated.wait()
            await trio.sleep(DRAIN_GRACE)  # a request arriving meanwhile stops the timer
        await trio.lowlevel.checkpoint_if_cancelled()  # a stop that raced the wake lands here
        if self._serving_no_request():
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()

    def _serving_no_request(self) -> bool:
        return getattr(self.protocol.protocol, "stream", None) is None

    def _client(self) -> str | None:
        protocol = getattr(self, "protocol", None)  # set once the connection has started
        return _address(protocol.client) if protocol is not None else None


def _count(config: Config, reason: str) -> None:
    """Count an early end. `install` replaces hypercorn's classes for every server in the
    process, and a server started on a plain Config (a test's, the simulator's) has no
    metrics: it gets the fixes, and counts nothing."""
    if isinstance(config, ConnectionConfig):
        config.metrics.connection_errors.labels(reason).inc()


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception that is not a group: what a connection failed with."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _address(client: tuple[str, int] | None) -> str | None:
    return None if client is None else f"{client[0]}:{client[1]}"


def install() -> None:
    """Have hypercorn serve every connection with the classes above (idempotent).
    `worker_serve` makes each connection's TCPServer, and `ProtocolWrapper` its
    H11Protocol, by the names their modules imported: those are replaced."""
    hypercorn.trio.run.TCPServer = MsgledgerTCPServer  # type: ignore[attr-defined]
    hypercorn.protocol.H11Protocol = HTTP11Protocol  # type: ignore[attr-defined]
