"""Signed Twilio webhooks (status callbacks, or inbound messages), pre-built as raw HTTP/1.1,
and the driver that replays them.

The requests are built once in Python (the signature costs about 45 µs each) and written to
two files: the concatenated bytes and their offsets. `bench/loadgen.c`, compiled here with
gcc, replays them over keep-alive connections with one request in flight per connection and
records each request's latency and status. Python never sits on the request path, so the
generator costs a few µs of CPU per request instead of the hundreds a Python client would.
"""

from __future__ import annotations

import array
import random
import resource
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
CALLBACK_PATH = "/twilio/status"
INBOUND_PATH = "/twilio/inbound"
API_VERSION = "2010-04-01"
FIRM_NUMBER = "+15005550006"  # the firm's number: sends from it, receives on it
STATUS_MIX = ("sent", "delivered", "delivered", "delivered", "undelivered", "failed")
ERROR_CODES = {"undelivered": "30003", "failed": "30008"}
MMS_SHARE = 0.2  # of inbound messages, each with one media file
INBOUND_BODIES = (  # what clients write: short, sometimes not ASCII, sometimes two segments
    "Yes, Thursday at 3 works for me.",
    "Can you call me back? I'm at the office until 6.",
    "Merci, bien reçu. À demain !",
    "STOP",
    "Here is the signed page you asked for, sorry for the delay. The other two follow "
    "tomorrow morning once my accountant has read them; tell me if anything is missing.",
    "👍",
)
MEDIA_TYPES = ("image/jpeg", "image/jpeg", "image/png", "application/pdf")
PLACES = (("US", "CA", "SAN FRANCISCO", "94105"), ("US", "NY", "NEW YORK", "10001"),
          ("US", "TX", "AUSTIN", "78701"), ("CA", "ON", "TORONTO", ""))
RECORD = 12  # bytes per result record written by loadgen.c: u32 done_us, u32 lat_us, u16, u16


@dataclass(frozen=True)
class RequestSet:
    """N pre-built requests on disk: `bin` holds the bytes, `idx` N+1 uint64 offsets."""

    bin: Path
    idx: Path
    count: int
    mean_bytes: int
    mean_body_bytes: int
    kind: str = "status"  # "status": status callbacks; "inbound": inbound messages
    with_media: int = 0  # requests that declare a media file


@dataclass(frozen=True)
class DriveResult:
    """What one loadgen run measured."""

    done_us: array.array[int]  # completion time of each request since the run started
    latency_us: array.array[int]
    status: array.array[int]  # HTTP status; 0 = connection error, 1 = unfinished
    elapsed_s: float
    reconnects: int
    client_cpu_s: float


def compile_c(source: Path, output: Path, *flags: str) -> Path:
    """Build `source` with gcc unless `output` is newer."""
    if output.exists() and output.stat().st_mtime >= source.stat().st_mtime:
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", *flags, "-o", str(output), str(source)]
    subprocess.run(cmd, check=True)
    return output


def loadgen_binary() -> Path:
    return compile_c(BENCH_DIR / "loadgen.c", OUT_DIR / "loadgen")


def _sid(rng: random.Random, prefix: str) -> str:
    return f"{prefix}{rng.getrandbits(128):032x}"


def _number(rng: random.Random) -> str:
    return f"+1555{rng.randrange(10**7):07d}"


def callback_params(rng: random.Random, account: str, service: str) -> dict[str, str]:
    """One realistic status callback's form parameters, with a fresh MessageSid."""
    sid = _sid(rng, "SM")
    status = rng.choice(STATUS_MIX)
    done = f"2411{rng.randrange(10, 29)}{rng.randrange(24):02d}{rng.randrange(60):02d}"
    params = {
        "SmsSid": sid,
        "SmsStatus": status,
        "MessageStatus": status,
        "To": _number(rng),
        "MessagingServiceSid": service,
        "MessageSid": sid,
        "AccountSid": account,
        "From": FIRM_NUMBER,
        "ApiVersion": API_VERSION,
        "RawDlrDoneDate": done,  # YYMMDDhhmm, the carrier's Done Date
    }
    if status in ERROR_CODES:
        params["ErrorCode"] = ERROR_CODES[status]
    return params


def inbound_params(rng: random.Random, account: str, service: str,
                   media_base: str) -> dict[str, str]:
    """One realistic incoming-message webhook's form parameters, in Twilio's order, with a
    fresh MessageSid: an SMS, or (MMS_SHARE of them) an MMS with one file at `media_base`,
    under the message's own media path as Twilio names it."""
    mms = rng.random() < MMS_SHARE
    sid = _sid(rng, "MM" if mms else "SM")
    body = rng.choice(INBOUND_BODIES)
    to_place, from_place = rng.choice(PLACES[:3]), rng.choice(PLACES)
    params: dict[str, str] = {}
    if mms:
        media = f"{media_base}/{API_VERSION}/Accounts/{account}/Messages/{sid}/Media/"
        params |= {"MediaContentType0": rng.choice(MEDIA_TYPES),
                   "MediaUrl0": media + _sid(rng, "ME")}
    params |= {
        "ToCountry": to_place[0], "ToState": to_place[1], "SmsMessageSid": sid,
        "NumMedia": "1" if mms else "0", "ToCity": to_place[2], "FromZip": from_place[3],
        "SmsSid": sid, "FromState": from_place[1], "SmsStatus": "received",
        "FromCity": from_place[2], "Body": body, "FromCountry": from_place[0],
        "To": FIRM_NUMBER, "MessagingServiceSid": service, "ToZip": to_place[3],
        "NumSegments": "1" if len(body) <= 160 else "2", "MessageSid": sid,
        "AccountSid": account, "From": _number(rng), "ApiVersion": API_VERSION,
    }
    return params


def raw_request(public_url: str, validator: RequestValidator, params: dict[str, str],
                path: str) -> tuple[bytes, int]:
    """The signed request to `path` (query included) as HTTP/1.1 bytes, and its body length."""
    body = urlencode(params).encode()
    signature = validator.compute_signature(public_url + path, params)
    host = public_url.split("://", 1)[1]
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: TwilioProxy/1.1\r\n"
        "Accept: */*\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Twilio-Signature: {signature}\r\n"
        f"I-Twilio-Idempotency-Token: {uuid.UUID(int=random.getrandbits(128))}\r\n"
        "X-Home-Region: us1\r\n"
        "\r\n"
    )
    return head.encode() + body, len(body)


# One request's form and path (query included), from the set's random source, its account
# and Messaging Service, and its index in the set.
Maker = Callable[[random.Random, str, str, int], tuple[dict[str, str], str]]


def build_requests(count: int, public_url: str, token: str, name: str,
                   seed: int = 1) -> RequestSet:
    """Write `count` unique signed callbacks (distinct MessageSid and ref) to bench/out."""
    def callback(rng: random.Random, account: str, service: str,
                 i: int) -> tuple[dict[str, str], str]:
        return callback_params(rng, account, service), f"{CALLBACK_PATH}?ref=b{seed:x}-{i:08d}"

    return _write_requests(count, public_url, token, name, seed, callback, "status")


def build_inbound_requests(count: int, public_url: str, token: str, name: str,
                           media_base: str, seed: int = 2) -> RequestSet:
    """Write `count` unique signed inbound messages (distinct MessageSid; no ref: Twilio
    posts to the number's URL as configured) to bench/out, their media at `media_base`."""
    def inbound(rng: random.Random, account: str, service: str,
                i: int) -> tuple[dict[str, str], str]:
        return inbound_params(rng, account, service, media_base), INBOUND_PATH

    return _write_requests(count, public_url, token, name, seed, inbound, "inbound")


def _write_requests(count: int, public_url: str, token: str, name: str, seed: int,
                    make: Maker, kind: str) -> RequestSet:
    rng = random.Random(seed)
    random.seed(seed)
    validator = RequestValidator(token)
    account, service = _sid(rng, "AC"), _sid(rng, "MG")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = OUT_DIR / f"{name}.bin", OUT_DIR / f"{name}.idx"
    offsets = array.array("Q", [0])
    body_total = with_media = 0
    with bin_path.open("wb") as out:
        for i in range(count):
            params, path = make(rng, account, service, i)
            data, body_len = raw_request(public_url, validator, params, path)
            out.write(data)
            offsets.append(offsets[-1] + len(data))
            body_total += body_len
            with_media += "MediaUrl0" in params
    with idx_path.open("wb") as out:
        offsets.tofile(out)
    return RequestSet(bin_path, idx_path, count, offsets[-1] // count, body_total // count,
                      kind, with_media)


def _read_records(path: Path) -> tuple[array.array[int], array.array[int], array.array[int]]:
    raw = array.array("I")
    with path.open("rb") as f:
        raw.frombytes(f.read())
    done, latency = raw[0::3], raw[1::3]
    status = array.array("I", (word & 0xFFFF for word in raw[2::3]))
    return done, latency, status


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _lines(proc: subprocess.Popen[str]) -> Iterator[str]:
    assert proc.stdout is not None
    yield from proc.stdout


def drive(port: int, reqs: RequestSet, first: int, count: int, *, conns: int,
          duration_s: float, progress_every: int = 0,
          on_progress: Callable[[int, float], None] | None = None,
          rate: float = 0.0, tag: str = "run") -> DriveResult:
    """Replay requests [first, first+count) against 127.0.0.1:port; stop early at duration_s.

    rate 0 is a closed loop; rate > 0 paces the requests at `rate` per second.
    """
    out = OUT_DIR / f"records-{tag}.bin"
    cmd = [str(loadgen_binary()), "run", "127.0.0.1", str(port), str(conns), str(reqs.bin),
           str(reqs.idx), str(first), str(count), f"{duration_s:g}", str(out),
           str(progress_every), f"{rate:g}"]
    cpu0 = _children_cpu()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        final = ""
        for line in _lines(proc):
            word, *rest = line.split()
            if word == "progress" and on_progress is not None:
                on_progress(int(rest[0]), int(rest[1]) / 1e6)
            elif word == "done":
                final = line
    if proc.returncode != 0 or not final:
        raise RuntimeError(f"loadgen failed with exit code {proc.returncode}")
    _, _, elapsed_us, _, reconnects = final.split()
    done, latency, status = _read_records(out)
    out.unlink()
    return DriveResult(done, latency, status, int(elapsed_us) / 1e6, int(reconnects),
                       _children_cpu() - cpu0)


def start_sink(port: int) -> subprocess.Popen[bytes]:
    """loadgen's own trivial server: an empty 200 for every request, keep-alive."""
    proc = subprocess.Popen([str(loadgen_binary()), "sink", str(port)])
    time.sleep(0.2)
    return proc
