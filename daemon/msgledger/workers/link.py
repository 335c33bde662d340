"""The link between the main process and one front: length-prefixed JSON frames over a
socketpair.

Each frame is a list whose first item is its kind (`FrameKind`). Each kind has one class
here, named for it (`events`: `EventsFrame`), which builds the frame (`to_wire`) and checks
and reads it (`from_wire`):

| frame | direction | carries |
|---|---|---|
| `["settings", {...}, url, routes]` | main -> front, first | `Settings`, public URL, app's routes |
| `["ready"]` | front -> main | the front's HTTP server listens |
| `["events", [wire event, ...]]` | front -> main | checked webhook events, each with an id |
| `["acks", [[id, seq, error], ...]]` | main -> front | per event: its sequence number or why not |
| `["request", id, {scope}, body]` | front -> main | a non-webhook HTTP request, whole |
| `["response", id, status, headers, body]` | main -> front | its answer, whole |
| `["tally", [[counter, {label: value}, total], ...]]` | front -> main | the front's counters |
| `["health", problem, poller]` | main -> front | why the store cannot commit; the poller state |
| `["drain"]` | main -> front | drain as on SIGTERM |

A reader decodes what arrives with `decode_to_main` or `decode_to_front` (a front's first
frame with `decode_settings`). A kind that reader does not read, or a frame of the wrong
shape, breaks the link (LinkBroken): the other end is not speaking this protocol. Only
decoding is checked so; what the reader then does with a frame is its own code.

JSON, not pickle: what crosses is built from HTTP input, and a frame must never be able to
run code. Bytes travel as latin-1 strings (a one-to-one map of bytes to code points).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol, Self, TypeAlias, TypeVar

import orjson
import trio
from hypercorn.typing import ConnectionState, HTTPScope

from ..events import Ack, Event, JournalUnavailable
from ..http.server import Routes
from ..settings import Settings

RawFrame: TypeAlias = list[Any]  # a frame as JSON gives it: a list led by its kind, unchecked
Answer: TypeAlias = tuple[int, list[tuple[bytes, bytes]], bytes]  # an HTTP status, headers, body
_LENGTH = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # bytes; senders split batches to stay under it
FRAME_BUDGET = MAX_FRAME // 2  # bytes of events a sender puts in one frame: ample slack
_RECEIVE_SIZE = 256 * 1024  # bytes per read: a busy link delivers many frames at once
_T = TypeVar("_T")


class LinkBroken(Exception):
    """A frame cannot cross: the other end sent something that is not a frame of this
    protocol (the link cannot be trusted after it), or a frame to send is over MAX_FRAME."""


class FrameKind(StrEnum):
    SETTINGS = "settings"
    READY = "ready"
    EVENTS = "events"
    ACKS = "acks"
    REQUEST = "request"
    RESPONSE = "response"
    TALLY = "tally"
    HEALTH = "health"
    DRAIN = "drain"


class Sendable(Protocol):
    """A frame `Link.send` can encode: any kind's but `events`, which goes pre-encoded."""

    def to_wire(self) -> RawFrame: ...


class Link:
    """One end of a front's link. `send` may be called from many tasks at once."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._sending = trio.Lock()  # a frame's bytes must not interleave with another's

    async def send(self, frame: Sendable) -> None:
        await self.send_encoded(orjson.dumps(frame.to_wire()))

    async def send_encoded(self, data: bytes) -> None:
        """Send one frame already encoded as JSON. Shielded once it starts: half a frame
        would leave the link unreadable for every frame after it. The peer is our own
        process and always reads; a peer that stops reading is killed by the supervisor."""
        if len(data) > MAX_FRAME:
            raise LinkBroken(f"frame of {len(data)} bytes, over {MAX_FRAME}")
        async with self._sending:
            with trio.CancelScope(shield=True):
                await self._stream.send_all(_LENGTH.pack(len(data)) + data)

    async def frames(self) -> AsyncIterator[RawFrame]:
        """Every frame the other end sends, until it closes its end; to be decoded."""
        buffer = bytearray()
        while chunk := await self._stream.receive_some(_RECEIVE_SIZE):
            buffer += chunk
            for frame in _split(buffer):
                yield frame
        if buffer:
            raise LinkBroken(f"closed in the middle of a frame ({len(buffer)} bytes left)")

    async def close(self) -> None:
        await self._stream.aclose()


def _split(buffer: bytearray) -> list[RawFrame]:
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


# ------------------------------------------------------------------------ the kinds
# Each `from_wire` raises KeyError, IndexError, TypeError or ValueError on a frame of the
# wrong shape; `_decoded` turns those, and only those, into LinkBroken.


@dataclass(frozen=True, slots=True)
class SettingsFrame:
    KIND: ClassVar = FrameKind.SETTINGS
    settings: Settings
    public_url: str
    routes: Routes

    def to_wire(self) -> RawFrame:
        return [self.KIND, asdict(self.settings), self.public_url, self.routes]

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        _, values, public_url, routes = frame
        # JSON has no tuples, and Settings holds no lists: each list was a tuple.
        values = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in _of(dict, values).items()}
        return cls(Settings(**values), _of(str, public_url),
                   [(_of(str, rule), [_of(str, m) for m in _of(list, methods)])
                    for rule, methods in _of(list, routes)])


@dataclass(frozen=True, slots=True)
class _BareFrame:
    """A frame that is its kind and nothing else."""

    KIND: ClassVar[FrameKind]

    def to_wire(self) -> RawFrame:
        return [self.KIND]

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        (_,) = frame
        return cls()


@dataclass(frozen=True, slots=True)
class ReadyFrame(_BareFrame):
    KIND: ClassVar = FrameKind.READY


@dataclass(frozen=True, slots=True)
class EventsFrame:
    """Not built from an instance: the forwarder encodes each event alone
    (`orjson.dumps(event_to_wire(...))`) to measure it, then `join`s them into a frame."""

    KIND: ClassVar = FrameKind.EVENTS
    events: list[tuple[int, Event]]  # each with the front's id for its ack

    @staticmethod
    def join(encoded: list[bytes]) -> bytes:
        return b'["events",[' + b",".join(encoded) + b"]]"

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        _, items = frame
        return cls([event_from_wire(item) for item in _of(list, items)])


@dataclass(frozen=True, slots=True)
class AcksFrame:
    KIND: ClassVar = FrameKind.ACKS
    acks: list[tuple[int, Ack]]  # each event's id and its answer

    def to_wire(self) -> RawFrame:
        return [self.KIND, [ack_to_wire(ident, ack) for ident, ack in self.acks]]

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        _, items = frame
        return cls([ack_from_wire(item) for item in _of(list, items)])


@dataclass(frozen=True, slots=True)
class RequestFrame:
    KIND: ClassVar = FrameKind.REQUEST
    ident: int
    scope: HTTPScope
    body: bytes

    def to_wire(self) -> RawFrame:
        return [self.KIND, self.ident, scope_to_wire(self.scope), _text(self.body)]

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        _, ident, scope, body = frame
        return cls(_of(int, ident), scope_from_wire(_of(dict, scope)), _bytes(body))


@dataclass(frozen=True, slots=True)
class ResponseFrame:
    KIND: ClassVar = FrameKind.RESPONSE
    ident: int  # the request's
    answer: Answer

    def to_wire(self) -> RawFrame:
        status, headers, body = self.answer
        return [self.KIND, self.ident, status, [[_text(k), _text(v)] for k, v in headers],
                _text(body)]

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        _, ident, status, headers, body = frame
        return cls(_of(int, ident), (_of(int, status),
                                     [(_bytes(k), _bytes(v)) for k, v in _of(list, headers)],
                                     _bytes(body)))


@dataclass(frozen=True, slots=True)
class TallyFrame:
    KIND: ClassVar = FrameKind.TALLY
    totals: list[list[Any]]  # `[counter, {label: value}, total]`, as `Metrics.tally` makes

    def to_wire(self) -> RawFrame:
        return [self.KIND, self.totals]

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        _, totals = frame
        for name, labels, total in _of(list, totals):
            _of(str, name)
            if not all(isinstance(t, str) for item in _of(dict, labels).items() for t in item):
                raise TypeError("labels are strings")
            if isinstance(total, bool) or not isinstance(total, int | float):
                raise TypeError("a total is a number")
        return cls(totals)


@dataclass(frozen=True, slots=True)
class HealthFrame:
    KIND: ClassVar = FrameKind.HEALTH
    problem: str | None  # why the store cannot commit; None: it commits
    poller: str  # the poller's state (`ServerState.poller`)

    def to_wire(self) -> RawFrame:
        return [self.KIND, self.problem, self.poller]

    @classmethod
    def from_wire(cls, frame: RawFrame) -> Self:
        _, problem, poller = frame
        return cls(None if problem is None else _of(str, problem), _of(str, poller))


@dataclass(frozen=True, slots=True)
class DrainFrame(_BareFrame):
    KIND: ClassVar = FrameKind.DRAIN


ToMain: TypeAlias = ReadyFrame | EventsFrame | RequestFrame | TallyFrame
ToFront: TypeAlias = AcksFrame | ResponseFrame | HealthFrame | DrainFrame  # after the settings
_TO_MAIN: Mapping[str, Callable[[RawFrame], ToMain]] = {
    ReadyFrame.KIND: ReadyFrame.from_wire, EventsFrame.KIND: EventsFrame.from_wire,
    RequestFrame.KIND: RequestFrame.from_wire, TallyFrame.KIND: TallyFrame.from_wire}
_TO_FRONT: Mapping[str, Callable[[RawFrame], ToFront]] = {
    AcksFrame.KIND: AcksFrame.from_wire, ResponseFrame.KIND: ResponseFrame.from_wire,
    HealthFrame.KIND: HealthFrame.from_wire, DrainFrame.KIND: DrainFrame.from_wire}


def decode_to_main(frame: RawFrame) -> ToMain:
    """A frame from a front, checked; LinkBroken if it is not one the main process reads."""
    return _decode(frame, _TO_MAIN, "the main process")


def decode_to_front(frame: RawFrame) -> ToFront:
    """A frame from the main process after its first, checked; LinkBroken if it is not one
    a front reads."""
    return _decode(frame, _TO_FRONT, "a front")


def decode_settings(frame: RawFrame) -> SettingsFrame:
    """The main process's first frame, checked; LinkBroken if it is not the settings."""
    if frame[0] != FrameKind.SETTINGS:
        raise LinkBroken(f"the main process sent {frame[0]!r:.40} before the settings")
    return _decoded(SettingsFrame.from_wire, frame)


def health_from_wire(frame: RawFrame) -> HealthFrame:
    """A `health` frame, checked; LinkBroken if malformed."""
    return _decoded(HealthFrame.from_wire, frame)


def _decode(frame: RawFrame, kinds: Mapping[str, Callable[[RawFrame], _T]], reader: str) -> _T:
    from_wire = kinds.get(frame[0])
    if from_wire is None:
        raise LinkBroken(f"a frame of a kind unknown to {reader}: {frame[0]!r:.40}")
    return _decoded(from_wire, frame)


def _decoded(from_wire: Callable[[RawFrame], _T], frame: RawFrame) -> _T:
    try:
        return from_wire(frame)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise LinkBroken(f"a malformed {frame[0]!r:.40} frame: {error!r:.200}") from error


# ---------------------------------------------------------- what the frames carry


def event_to_wire(ident: int, event: Event) -> list[Any]:
    return [ident, event.kind, event.source, event.at, event.sid, event.ref, event.status,
            event.data]


def event_from_wire(item: list[Any]) -> tuple[int, Event]:
    ident, kind, source, at, sid, ref, status, data = item
    return ident, Event(kind, source, at, sid=sid, ref=ref, status=status, data=data)


def ack_to_wire(ident: int, ack: Ack) -> list[Any]:
    if isinstance(ack, JournalUnavailable):
        return [ident, None, str(ack)]
    return [ident, ack, None]


def ack_from_wire(item: list[Any]) -> tuple[int, Ack]:
    ident, seq, error = item
    if not isinstance(ident, int):  # the front looks its reply up by it
        raise TypeError("an ack's id is an integer")
    return ident, JournalUnavailable(error) if seq is None else int(seq)


def scope_to_wire(scope: HTTPScope) -> dict[str, Any]:
    """What the main process needs of a relayed request's ASGI scope."""
    return {"method": scope["method"], "path": scope["path"],
            "raw_path": _text(scope.get("raw_path") or scope["path"].encode()),
            "query_string": _text(scope["query_string"]), "scheme": scope["scheme"],
            "http_version": scope["http_version"], "client": scope.get("client"),
            "server": scope.get("server"),
            "headers": [[_text(k), _text(v)] for k, v in scope["headers"]]}


def scope_from_wire(wire: dict[str, Any]) -> HTTPScope:
    client, server = wire["client"], wire["server"]
    return {"type": "http", "state": ConnectionState({}),
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": _of(str, wire["http_version"]), "method": _of(str, wire["method"]),
            "scheme": _of(str, wire["scheme"]), "path": _of(str, wire["path"]),
            "raw_path": _bytes(wire["raw_path"]),
            "query_string": _bytes(wire["query_string"]), "root_path": "",
            "headers": [(_bytes(k), _bytes(v)) for k, v in _of(list, wire["headers"])],
            "client": tuple(_of(list, client)) if client else None,
            "server": tuple(_of(list, server)) if server else None, "extensions": {}}


def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _bytes(text: object) -> bytes:
    """Bytes sent as `_text`; TypeError or ValueError if `text` was not made so."""
    return _of(str, text).encode("latin-1")


def _of(kind: type[_T], value: object) -> _T:
    """`value`, which must be a `kind`: TypeError (a malformed frame) if not."""
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
