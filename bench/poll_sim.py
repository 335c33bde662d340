"""The Twilio simulator for bench/poll.py and bench/reconcile.py, in a process of its own.

    .venv/bin/python bench/poll_sim.py --backlog 100000 --fetch-latency 0.05
    .venv/bin/python bench/poll_sim.py --backlog 1000000 --fetch-latency 0 --day 2026-11-27

Serves msgledger's simulator (`msgledger.sim.serve_sim`) on a free port of 127.0.0.1 with
the backlog's messages already `delivered`, under the SIDs `backlog_sid(i)` that poll.py
writes into the store, so every poll changes its record. It prints its base URL as one line
on stdout once it listens, and on SIGTERM (or SIGINT) one more, `stats {...}`: its request
counters as JSON. Its own process, so the daemon's CPU figures leave its work out. With
`--day` the messages are of that UTC day (bench/reconcile.py lists and exports it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
from dataclasses import asdict

import trio

from msgledger.sim import SimKnobs, Simulator, serve_sim

ACCOUNT_SID = "AC" + "5" * 32  # a made-up account, Twilio's format


def backlog_sid(i: int) -> str:
    """The i-th backlog message's SID ("SM" + 32 hex), the same in the store and here."""
    return f"SM{i:032x}"


def fill(sim: Simulator, count: int, day: dt.date | None = None) -> None:
    """`count` delivered messages, now or (for bench/reconcile.py) through `day`, a
    millisecond apart from its noon."""
    noon = dt.datetime.combine(day, dt.time(12), dt.UTC) if day else None
    for i in range(count):
        when = noon + dt.timedelta(milliseconds=i) if noon else None
        sim.add_message(to=f"+1555{i % 10**7:07d}", status="delivered", sid=backlog_sid(i),
                        date_created=when, date_sent=when)


async def serve(knobs: SimKnobs, count: int, day: dt.date | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then print the simulator's counters."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            sim: Simulator = await nursery.start(serve_sim, knobs)
            fill(sim, count, day)
            print(sim.base_url, flush=True)
            async for _ in signals:
                break
            print(f"stats {json.dumps(asdict(sim.stats))}", flush=True)
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backlog", type=int, required=True, help="messages to hold")
    p.add_argument("--fetch-latency", type=float, required=True, help="seconds per fetch")
    p.add_argument("--auth-token", required=True, help="the account's auth token")
    p.add_argument("--day", type=dt.date.fromisoformat, default=None,
                   help="YYYY-MM-DD: the messages are of that day (default: now)")
    p.add_argument("--export-job-delay", type=float, default=60.0,
                   help="seconds a Bulk Export job takes to complete")
    args = p.parse_args(argv)
    knobs = SimKnobs(ACCOUNT_SID, args.auth_token, fetch_latency=args.fetch_latency, seed=1,
                     export_job_delay=args.export_job_delay)
    trio.run(serve, knobs, args.backlog, args.day)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
