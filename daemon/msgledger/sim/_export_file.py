"""A day's Bulk Export file: one JSON object per line, gzip-compressed as it is written.

Rows follow Twilio's file format (docs/twilio.md, "Bulk Export"): the Message resource's
fields with UTC ISO-8601 dates, `num_segments` and `num_media` as numbers, `error_code` 0 for
none, and no `error_message`, `price_unit`, `api_version` or `uri`; plus `flags`, `start`
and `price`, keys a real file carries too (their values here are our stand-ins: readers
must ignore them). Each message the simulator holds is a row with its own `direction` (texts
received by `Simulator.receive_inbound` included); the made-up received rows of the
`export_inbound_per_day` knob are spread evenly through them, and raw lines a test added go
last.

Rows are serialized and compressed in batches straight into one buffer, so a day of a
million messages never exists uncompressed: the only whole copy is the compressed file.
"""

from __future__ import annotations

import io
import itertools
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta

import orjson

from ._knobs import Dice
from ._lifecycle import SERVICE_SENDER
from ._store import SimMessage
from ._wire import redact, shown_numbers

GZIP_LEVEL = 1  # zlib's fastest, and still 10x: 1 M rows are 470 MB of JSON, 45 MB gzipped
BATCH_ROWS = 2048  # rows joined per compress call: fewer calls, each well under a megabyte
_DUMPS = orjson.OPT_UTC_Z | orjson.OPT_OMIT_MICROSECONDS | orjson.OPT_APPEND_NEWLINE
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib's way of asking for a gzip header and trailer
SECONDS_A_DAY = 86_400


def export_day(message: SimMessage) -> date:
    """The file a message belongs to: the UTC day of its `date_sent`, or of `date_created`
    if it was never sent."""
    return message.listed_at.astimezone(UTC).date()


def message_line(message: SimMessage, *, redact_to: bool) -> bytes:
    """A message as a file row, newline included (`redact_to`: whether the customer's
    number ends in XXXX)."""
    to, from_ = shown_numbers(message, redact_to=redact_to)
    row = {
        "date_updated": message.date_updated,
        "date_sent": message.date_sent,
        "date_created": message.date_created,
        "body": message.body,
        "num_segments": int(message.num_segments),
        "sid": message.sid,
        "num_media": len(message.media),
        "messaging_service_sid": message.messaging_service_sid,
        "account_sid": message.account_sid,
        "from": from_,
        "error_code": message.error_code or 0,
        "to": to,
        "status": message.status,
        "direction": message.direction,
        "flags": ["inbound" if message.is_inbound else "outbound"],
        "start": message.date_created,
        "price": message.price,
    }
    return orjson.dumps(row, option=_DUMPS)


def inbound_lines(
    day: date, count: int, account_sid: str, dice: Dice, *, redact_from: Callable[[datetime], bool]
) -> list[bytes]:
    """`count` texts received on `day` from customers' numbers (`redact_from`: whether the
    customer's number, not Twilio's, shows as XXXX for a text received then)."""
    midnight = datetime.combine(day, time(), UTC)
    lines = []
    for n in range(count):
        received = midnight + timedelta(seconds=dice.below(SECONDS_A_DAY))
        customer = f"+1555{dice.below(10**7):07d}"
        row = {
            "date_updated": received,
            "date_sent": received,
            "date_created": received,
            "body": f"Reply {n + 1}",
            "num_segments": 1,
            "sid": "SM" + dice.hex32(),
            "num_media": 0,
            "messaging_service_sid": None,
            "account_sid": account_sid,
            "from": redact(customer) if redact_from(received) else customer,
            "error_code": 0,
            "to": SERVICE_SENDER,  # customers answer the number the simulator sends from
            "status": "received",
            "direction": "inbound",
            "flags": ["inbound"],
            "start": received,
            "price": "-0.00790",
        }
        lines.append(orjson.dumps(row, option=_DUMPS))
    return lines


def day_file(
    messages: Sequence[SimMessage],
    inbound: Sequence[bytes],
    raw: Sequence[bytes],
    *,
    redact_to: Callable[[SimMessage], bool],
) -> bytes:
    """The gzip file of one day: `messages`, `inbound` spread among them, then `raw`."""
    held = (message_line(m, redact_to=redact_to(m)) for m in messages)
    tail = (line if line.endswith(b"\n") else line + b"\n" for line in raw)
    return gzip_lines(itertools.chain(_spread(held, len(messages), inbound), tail))


def _spread(main: Iterator[bytes], length: int, extra: Sequence[bytes]) -> Iterator[bytes]:
    """`main` (of `length` items) in order, with `extra` evenly between them."""
    done = 0
    for k, item in enumerate(extra):
        cut = (k + 1) * length // (len(extra) + 1)
        yield from itertools.islice(main, cut - done)
        yield item
        done = cut
    yield from main


def gzip_lines(lines: Iterable[bytes]) -> bytes:
    """`lines` compressed into one gzip file, batch by batch."""
    out = io.BytesIO()  # getvalue() hands over its buffer: no second copy of the file
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    rows = iter(lines)
    while batch := list(itertools.islice(rows, BATCH_ROWS)):
        out.write(packer.compress(b"".join(batch)))
    out.write(packer.flush())
    return out.getvalue()
