"""Handler benchmark: what msgledger's own code costs per callback, without HTTP.

    .venv/bin/python bench/handler.py            # 20,000 unique signed callbacks, 3 rounds

Drives `WebhookReceiver` (signature check, form parsing, the event, the journal handoff,
the log line and the metrics) from 64 concurrent tasks, with the real journal actor
committing to a real SQLite file in a temporary directory, as the daemon wires them, but
with ASGI `receive`/`send` stubs instead of hypercorn. It prints, per round, the callbacks
per second, the CPU the event loop's thread spent per callback (`time.thread_time`), and
the CPU of the whole process per callback; the difference is mostly the journal writer's
thread. Log lines go to /dev/null.

`ingest.py` measures the daemon; this isolates the part msgledger's code controls, with
less noise, so a change to the handler can be judged in a minute. Inside the daemon the
same work costs more (it competes with hypercorn for the CPU's caches).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from typing import Any
from urllib.parse import urlencode

import trio
from twilio.request_validator import RequestValidator

from ingest import AUTH_TOKEN, PUBLIC_URL
from loadgen import CALLBACK_PATH, callback_params
from msgledger import logs
from msgledger.deadlines import AckDeadlines
from msgledger.events import Submission
from msgledger.http.signature import SignatureChecker
from msgledger.http.state import ServerState
from msgledger.http.webhooks import WebhookReceiver
from msgledger.journal import run_journal
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics
from msgledger.store import JournalWriter

PRODUCERS = 64  # as ingest.py's keep-alive connections
Request = tuple[dict[str, Any], bytes]


def build(count: int, seed: int = 1) -> list[Request]:
    """Unique signed status callbacks with a `ref` each, the same mix `ingest.py` sends."""
    rng = random.Random(seed)
    validator = RequestValidator(AUTH_TOKEN)
    account, service = "AC" + "1" * 32, "MG" + "2" * 32
    return [_request(validator, callback_params(rng, account, service), f"bench-{n}")
            for n in range(count)]


def _request(validator: RequestValidator, params: dict[str, str], ref: str) -> Request:
    query = f"ref={ref}"
    signature = validator.compute_signature(f"{PUBLIC_URL}{CALLBACK_PATH}?{query}", params)
    body = urlencode(params).encode()
    headers = [(b"host", b"ledger.example.com"),
               (b"content-type", b"application/x-www-form-urlencoded"),
               (b"content-length", str(len(body)).encode()),
               (b"x-twilio-signature", signature.encode()),
               (b"i-twilio-idempotency-token", f"idem-{ref}".encode()),
               (b"user-agent", b"TwilioProxy/1.1")]
    scope = {"type": "http", "method": "POST", "path": CALLBACK_PATH,
             "raw_path": CALLBACK_PATH.encode(), "query_string": query.encode(),
             "headers": headers}
    return scope, body


async def one_round(requests: list[Request], workdir: str) -> tuple[float, float, float]:
    """(callbacks/s, event-loop CPU µs per callback, process CPU µs per callback)."""
    writer = JournalWriter.open(os.path.join(workdir, f"{time.monotonic_ns()}.db"))
    metrics, deadlines = Metrics(), AckDeadlines(5.0)
    intake, inbox = trio.open_memory_channel[Submission](1024)
    receiver = WebhookReceiver(JournalClient(intake, deadlines), SignatureChecker(AUTH_TOKEN),
                               state=ServerState(public_url=PUBLIC_URL), max_body=65536,
                               metrics=metrics)
    answers: list[int] = []
    pending = iter(requests)
    try:
        async with trio.open_nursery() as timers:
            timers.start_soon(deadlines.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(run_journal, inbox, writer=writer, metrics=metrics))
                with intake:
                    started = (time.perf_counter(), time.thread_time(), time.process_time())
                    async with trio.open_nursery() as load:
                        for _ in range(PRODUCERS):
                            load.start_soon(_produce, receiver, pending, answers)
                    ended = (time.perf_counter(), time.thread_time(), time.process_time())
            timers.cancel_scope.cancel()  # the journal has ended: every reply is answered
    finally:
        writer.close()
    if answers.count(200) != len(requests):
        raise SystemExit(f"not every callback was answered 200: {sorted(set(answers))}")
    count = len(requests)
    return (count / (ended[0] - started[0]), (ended[1] - started[1]) / count * 1e6,
            (ended[2] - started[2]) / count * 1e6)


async def _produce(receiver: WebhookReceiver, pending: Any, answers: list[int]) -> None:
    for scope, body in pending:
        async def receive(body: bytes = body) -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answers.append(message["status"])

        await receiver(scope, receive, send)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # the log lines; results go to stderr
    logs.configure("info")
    requests = build(args.callbacks)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            rows.append(trio.run(one_round, requests, workdir))
    for rate, loop_us, process_us in rows:
        print(f"  {rate:7.0f} callbacks/s  event loop {loop_us:5.0f} µs/callback"
              f"  process {process_us:5.0f} µs/callback", file=sys.stderr)
    print(f"median: event loop {statistics.median(r[1] for r in rows):.0f} µs, process "
          f"{statistics.median(r[2] for r in rows):.0f} µs per callback "
          f"({args.callbacks} callbacks, {PRODUCERS} producers)", file=sys.stderr)


if __name__ == "__main__":
    main()
