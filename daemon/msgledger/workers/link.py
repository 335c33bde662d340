"""The link between the main process and one front: length-prefixed JSON frames over a
socketpair.

Each frame is a list whose first item names it:

| frame | direction | carries |
|---|---|---|
| `["settings", {...}, url, routes]` | main -> front, first | `Settings`, public URL, app's routes |
| `["ready"]` | front -> main | the front's HTTP server listens |
| `["events", [wire event, ...]]` | front -> main | checked webhook events, each with an id |
| `["acks", [[id, seq, error], ...]]` | main -> front | per event: its sequence number or why not |
| `["request", id, {scope}, body]` | front -> main | a non-webhook HTTP request, whole |
| `["response", id, status, headers, body]` | main -> front | its answer, whole |
| `["tally", [[counter, {label: value}, total], ...]]` | front -> main | the front's counters |
| `["health", reason]` | main -> front | why the store cannot commit now, or null once it can |
| `["drain"]` | main -> front | drain as on SIGTERM |

JSON, not pickle: what crosses is built from HTTP input, and a frame must never be able to
run code. Bytes travel as latin-1 strings (a one-to-one map of bytes to code points).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import orjson
import trio
from hypercorn.typing import ConnectionState, HTTPScope

from ..events import Ack, Event, JournalUnavailable

Frame: TypeAlias = list[Any]
_LENGTH = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # bytes; senders split batches to stay under it
FRAME_BUDGET = MAX_FRAME // 2  # bytes of events a sender puts in one frame: ample slack
_RECEIVE_SIZE = 256 * 1024  # bytes per read: a busy link delivers many frames at once


class LinkBroken(Exception):
    """A frame cannot cross: the other end sent something that is not a frame (the link
    cannot be trusted after it), or a frame to send is over MAX_FRAME."""


class Link:
    """One end of a front's link. `send` may be called from many tasks at once."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._sending = trio.Lock()  # a frame's bytes must not interleave with another's

    async def send(self, frame: Frame) -> None:
        await self.send_encoded(orjson.dumps(frame))

    async def send_encoded(self, data: bytes) -> None:
        """Send one frame already encoded as JSON. Shielded once it starts: half a frame
        would leave the link unreadable for every frame after it. The peer is our own
        process and always reads; a peer that stops reading is killed by the supervisor."""
        if len(data) > MAX_FRAME:
            raise LinkBroken(f"frame of {len(data)} bytes, over {MAX_FRAME}")
        async with self._sending:
            with trio.CancelScope(shield=True):
                await self._stream.send_all(_LENGTH.pack(len(data)) + data)

    async def frames(self) -> AsyncIterator[Frame]:
        """Every frame the other end sends, until it closes its end."""
        buffer = bytearray()
        while chunk := await self._stream.receive_some(_RECEIVE_SIZE):
            buffer += chunk
            for frame in _split(buffer):
                yield frame
        if buffer:
            raise LinkBroken(f"closed in the middle of a frame ({len(buffer)} bytes left)")

    async def close(self) -> None:
        await self._stream.aclose()


def _split(buffer: bytearray) -> list[Frame]:
    """The whole frames at the front of `buffer`, removed from it."""
    frames, start = [], 0
    while len(buffer) - start >= _LENGTH.size:
        (size,) = _LENGTH.unpack_from(buffer, start)
        if size > MAX_FRAME:
            raise LinkBroken(f"frame of {size} bytes, over {MAX_FRAME}")
        end = start + _LENGTH.size + size
        if len(buffer) < end:
            break
        try:
            frame = orjson.loads(memoryview(buffer)[start + _LENGTH.size:end])
        except orjson.JSONDecodeError as error:
            raise LinkBroken(f"a frame that is not JSON: {error}") from error
        if not isinstance(frame, list) or not frame or not isinstance(frame[0], str):
            raise LinkBroken("a frame is a list that starts with its name")
        frames.append(frame)
        start = end
    del buffer[:start]
    return frames


# ------------------------------------------------------------------- wire formats


def event_to_wire(ident: int, event: Event) -> list[Any]:
    return [ident, event.kind, event.source, event.at, event.sid, event.ref, event.status,
            event.data]


def events_frame(encoded: list[bytes]) -> bytes:
    """An `events` frame from events each already encoded (`orjson.dumps(event_to_wire)`),
    so a sender can measure them before it builds the frame."""
    return b'["events",[' + b",".join(encoded) + b"]]"


def event_from_wire(item: list[Any]) -> tuple[int, Event]:
    ident, kind, source, at, sid, ref, status, data = item
    return ident, Event(kind, source, at, sid=sid, ref=ref, status=status, data=data)


def ack_to_wire(ident: int, ack: Ack) -> list[Any]:
    if isinstance(ack, JournalUnavailable):
        return [ident, None, str(ack)]
    return [ident, ack, None]


def ack_from_wire(item: list[Any]) -> tuple[int, Ack]:
    ident, seq, error = item
    return ident, JournalUnavailable(error) if seq is None else int(seq)


def health_frame(problem: str | None) -> Frame:
    return ["health", problem]


def health_from_wire(frame: Frame) -> str | None:
    """A `health` frame's reason (None: the store commits); LinkBroken if malformed."""
    if len(frame) != 2 or not (frame[1] is None or isinstance(frame[1], str)):
        raise LinkBroken(f"a malformed 'health' frame: {frame!r:.200}")
    return frame[1]


def to_text(data: bytes) -> str:
    return data.decode("latin-1")


def to_bytes(text: str) -> bytes:
    return text.encode("latin-1")


def scope_to_wire(scope: HTTPScope) -> dict[str, Any]:
    """What the main process needs of a relayed request's ASGI scope."""
    return {"method": scope["method"], "path": scope["path"],
            "raw_path": to_text(scope.get("raw_path") or scope["path"].encode()),
            "query_string": to_text(scope["query_string"]), "scheme": scope["scheme"],
            "http_version": scope["http_version"], "client": scope.get("client"),
            "server": scope.get("server"),
            "headers": [[to_text(k), to_text(v)] for k, v in scope["headers"]]}


def scope_from_wire(wire: dict[str, Any]) -> HTTPScope:
    client, server = wire["client"], wire["server"]
    return {"type": "http", "state": ConnectionState({}),
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": wire["http_version"], "method": wire["method"],
            "scheme": wire["scheme"], "path": wire["path"],
            "raw_path": to_bytes(wire["raw_path"]),
            "query_string": to_bytes(wire["query_string"]), "root_path": "",
            "headers": [(to_bytes(k), to_bytes(v)) for k, v in wire["headers"]],
            "client": tuple(client) if client else None,
            "server": tuple(server) if server else None, "extensions": {}}
