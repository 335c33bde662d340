"""A Bulk Export day file, read as it downloads: gzip decompressed chunk by chunk, split
into lines, each parsed leniently (docs/twilio.md, "Bulk Export"). Never more than a chunk
and a batch in memory, whatever the day's size.

Blocking (urllib3 and zlib): the run calls `DayFile.batch` from a worker thread.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import orjson

from .rows import broken

CHUNK = 256 * 1024  # compressed bytes a read
INFLATE_MOST = 256 * 1024  # bytes inflated at a time
MAX_LINE = 64 * 1024  # bytes: a row is at most a few KB; a longer "line" is cut (broken)


class Readable(Protocol):
    def read(self, amt: int) -> bytes: ...


def chunks_of(stream: Readable) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def lines_of(compressed: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a gzip stream (its members one after the other, as `gzip` reads
    them); zlib.error if it is not gzip or ends in the middle of a member. At most
    INFLATE_MOST bytes are inflated at a time: JSON lines compress fiftyfold, so one
    chunk would otherwise become 13 MB, and its lines as many again."""
    inflate, pending = zlib.decompressobj(wbits=31), b""
    for chunk in compressed:
        while True:
            data = inflate.decompress(chunk, INFLATE_MOST)
            chunk = inflate.unconsumed_tail
            if inflate.eof and inflate.unused_data:  # the next member starts here
                chunk, inflate = inflate.unused_data, zlib.decompressobj(wbits=31)
            *whole, pending = (pending + data).split(b"\n")
            yield from whole
            if len(pending) > MAX_LINE:
                yield pending[:MAX_LINE]
                pending = b""
            if not chunk and len(data) < INFLATE_MOST:
                break
    if not inflate.eof:
        raise zlib.error("the file ends in the middle of its gzip stream")
    if pending:
        yield pending


def parse_line(line: bytes) -> object:
    """One line as its JSON value (read as a row by the comparison, `rows.from_export`),
    `Broken` if it is not JSON; None for a blank line."""
    if not line.strip():
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        return broken(f"not JSON: {error}", line)
    return broken("null", line) if value is None else value


class DayFile:
    """A day file being read; `batch` gives its next rows, `lines` counts those read.
    The first `skip` lines are read past unparsed (compared by an earlier download)."""

    def __init__(self, compressed: Iterable[bytes], *, skip: int = 0) -> None:
        self._lines = lines_of(compressed)
        self._skip = skip
        self.lines = 0

    def batch(self, size: int) -> list[object]:
        """Up to `size` more lines' values; [] once the file is read. Raises what the
        download or the gzip stream raises (urllib3's errors, zlib.error)."""
        rows: list[object] = []
        for line in self._lines:
            self.lines += 1
            if self.lines <= self._skip:
                continue
            row = parse_line(line)
            if row is not None:
                rows.append(row)
                if len(rows) == size:
                    break
        return rows
