"""What one fetch costs the daemon's CPU, by the HTTP client under the `twilio` client.

    .venv/bin/python bench/http_client.py                  # 2,000 fetches each, 3 rounds
    .venv/bin/python bench/http_client.py --fetches 5000 --rounds 5

Starts the simulator (`bench/poll_sim.py`) in its own process with no fetch latency, then
from one thread of this process fetches its messages through the real `twilio` client
over three HTTP clients in turn, each round: the stock `TwilioHttpClient` (`requests`, the
baseline), the same with the session's `trust_env` off (no re-reading of the proxy
variables), and msgledger's `PooledHttpClient` (urllib3). CPU is this process's
(`time.process_time`): the simulator's work is in the other process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from twilio.http import HttpClient
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from msgledger.twilio_http import PooledHttpClient
from poll_sim import ACCOUNT_SID, backlog_sid  # beside this script, as in poll.py

TOKEN = "b" * 32
MESSAGES = 1000


def stock() -> HttpClient:
    return TwilioHttpClient(timeout=15)


def stock_without_environment() -> HttpClient:
    client = TwilioHttpClient(timeout=15)
    client.session.trust_env = False
    return client


CLIENTS: dict[str, Callable[[str], HttpClient]] = {
    "TwilioHttpClient (requests)": lambda url: stock(),
    "TwilioHttpClient, trust_env off": lambda url: stock_without_environment(),
    "PooledHttpClient (urllib3)": lambda url: PooledHttpClient(url, timeout=15,
                                                               connections=4),
}


def cost(base_url: str, http: HttpClient, fetches: int) -> tuple[float, float]:
    """CPU ms and wall ms a fetch, after 50 to warm the connection."""
    client = Client(ACCOUNT_SID, TOKEN, http_client=http, environment={"BENCH": "1"})
    client.api.base_url = base_url
    for i in range(50):
        client.messages(backlog_sid(i)).fetch()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(fetches):
        assert client.messages(backlog_sid(i % MESSAGES)).fetch().status == "delivered"
    return (1000 * (time.process_time() - cpu) / fetches,
            1000 * (time.perf_counter() - wall) / fetches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fetches", type=int, default=2000, help="fetches per client per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all three clients")
    args = p.parse_args()
    sim = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "poll_sim.py"), "--backlog",
         str(MESSAGES), "--fetch-latency", "0", "--auth-token", TOKEN],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert sim.stdout is not None
        base_url = sim.stdout.readline().strip()
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
        for _ in range(args.rounds):
            for name, make in CLIENTS.items():
                figures[name].append(cost(base_url, make(base_url), args.fetches))
    finally:
        sim.terminate()
        sim.wait()
    report(figures, args.fetches)


def report(figures: dict[str, list[tuple[float, float]]], fetches: int) -> None:
    baseline = statistics.median(cpu for cpu, _ in figures["TwilioHttpClient (requests)"])
    print(f"{fetches} fetches per client per round, median of {len(next(iter(figures.values())))}"
          " rounds, one thread, simulator in its own process (no latency)")
    print(f"{'client':34} {'CPU ms/fetch':>12} {'x baseline':>10} {'wall ms/fetch':>13}")
    for name, runs in figures.items():
        cpu = statistics.median(c for c, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(f"{name:34} {cpu:12.3f} {cpu / baseline:10.2f} {wall:13.3f}")


if __name__ == "__main__":
    main()
