"""A lean HTTP/1.1 server: Trio sockets with h11, keep-alive, one request at a time per connection.

Why not hypercorn: the lost-create knob must drop the connection with no response at all, and
an ASGI app cannot do that (hypercorn answers 500 for an app that fails before responding).
Here a handler raises `DropConnection` and the socket is closed with nothing written, or
answers a `Response` with `cut_after` set: its head (with the full Content-Length) and that
many body bytes go out, then the socket is closed, as a download broken off mid-way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import h11
import trio

MAX_BODY = 1 << 20  # bytes; a create form is a few KB, anything near this is a client bug
# (headers are capped by h11 itself, at 16 KiB)
RECEIVE_SIZE = 64 * 1024  # bytes per socket read
SEND_SIZE = 256 * 1024  # bytes per body write: an export file of 100 MB is never copied whole


@dataclass(frozen=True)
class Request:
    """One HTTP request, body included."""

    method: str
    target: str  # path and query, as sent
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Response:
    """One HTTP response; Content-Length is added on sending."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    cut_after: int | None = None  # send only this many body bytes, then drop the connection


class DropConnection(Exception):
    """Raised by a handler to close the connection without answering."""


Handler = Callable[[Request], Awaitable[Response]]


class _Closed(Exception):
    """The peer went away or broke the protocol: end the connection quietly."""


async def serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    """Answer requests on one connection until the peer closes it or a handler drops it."""
    connection = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                request = await _receive_request(connection, stream)
                await _send_reply(connection, stream, await handler(request))
                if not _next_cycle(connection):
                    return
        except (_Closed, DropConnection):
            return


def _next_cycle(connection: h11.Connection) -> bool:
    """Get ready for the next request on a keep-alive connection; False to close instead."""
    if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
        connection.start_next_cycle()
        return True
    return False


async def _receive_request(connection: h11.Connection, stream: trio.SocketStream) -> Request:
    head = await _next_event(connection, stream)
    if not isinstance(head, h11.Request):
        raise _Closed
    body = bytearray()
    while isinstance(event := await _next_event(connection, stream), h11.Data):
        body += event.data
        if len(body) > MAX_BODY:
            raise _Closed
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
    return Request(head.method.decode("ascii"), head.target.decode("latin-1"), headers, bytes(body))


async def _next_event(connection: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    try:
        while (event := connection.next_event()) is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(RECEIVE_SIZE))
    except (h11.RemoteProtocolError, trio.BrokenResourceError) as error:
        raise _Closed from error
    if not isinstance(event, h11.Event) or isinstance(event, h11.ConnectionClosed):
        raise _Closed  # PAUSED (a pipelining client) is not supported either
    return event


async def _send_reply(connection: h11.Connection, stream: trio.SocketStream,
                      reply: Response) -> None:
    """Send `reply` in pieces; raises DropConnection once a cut reply's bytes are out."""
    headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
    body = memoryview(reply.body)[: reply.cut_after]
    try:
        await stream.send_all(connection.send(h11.Response(status_code=reply.status,
                                                           headers=headers)))
        for start in range(0, len(body), SEND_SIZE):
            piece = bytes(body[start : start + SEND_SIZE])
            await stream.send_all(connection.send(h11.Data(data=piece)))
        if reply.cut_after is not None:
            raise DropConnection
        await stream.send_all(connection.send(h11.EndOfMessage()))
    except trio.BrokenResourceError as error:
        raise _Closed from error
