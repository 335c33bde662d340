"""How fast the reconciler compares a day with the store, by source, and in how much memory.

    .venv/bin/python bench/reconcile.py                    # 1,000,000 messages, all cases
    .venv/bin/python bench/reconcile.py --messages 100000  # a tenth
    .venv/bin/python bench/reconcile.py --cases export,list

Writes a store holding a day of `--messages` messages (5 days ago; 1 % of them `sent` in
the store and `delivered` at Twilio: stale), starts the simulator (bench/poll_sim.py) with
the same messages, and for each case starts the daemon on a copy of the store, asks for
one run of the day (`POST /v1/reconcile`), and reads its report:

- export: the Bulk Export path (the simulator's day file: a job, then the download);
- list: the list path (1,000 a page, no added latency);
- import: the export path against an empty store, every message imported.

Local work is the run's `duration_s` less its `waited_s` (the time it waited for Twilio's
answers: the list's pages, the day's link); the download and decompression of the file
count as local work. The baseline, in the same run, is reading the same source with nothing
compared: the day file downloaded, decompressed and each line parsed with orjson, and the
list's pages fetched with http.client and parsed. Peak RSS is the daemon's VmHWM.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import gzip
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

import loadgen
import targets
from ingest import AUTH_TOKEN, PUBLIC_URL
from loadgen import OUT_DIR
from msgledger.events import Event
from msgledger.store import JournalWriter
from poll import copy_store, environment, wait_quiet
from poll_sim import ACCOUNT_SID, backlog_sid

API_TOKEN = "bench-reconcile-token"
BATCH = 1000  # register events a commit while the store is written
STALE_EVERY = 100  # one message in this many is stale in the store: 1 %
TARGETS = {"export": 50_000.0, "list": 20_000.0}  # messages/s of local work (the issue's)
RSS_LIMIT_MB = 300.0
RUN_TIMEOUT_S = 1800.0
DAY = dt.date.today() - dt.timedelta(days=5)  # Bulk Export makes files of days 2 days old


def build_store(path: Path, count: int) -> float:
    """The day's messages, as an app registered them; 1 % stale. Seconds it took."""
    started = time.perf_counter()
    noon = dt.datetime.combine(DAY, dt.time(12), dt.UTC)
    writer = JournalWriter.open(str(path))
    try:
        for first in range(0, count, BATCH):
            writer.append([Event(
                "register", "register",
                (noon + dt.timedelta(milliseconds=i)).isoformat(timespec="microseconds"),
                sid=backlog_sid(i), status="sent" if i % STALE_EVERY == 0 else "delivered",
                data={"to": f"+1555{i % 10**7:07d}", "from": "+15005550006"})
                for i in range(first, min(count, first + BATCH))])
    finally:
        writer.close()
    return time.perf_counter() - started


class Sim:
    """bench/poll_sim.py holding the day: its process and base URL."""

    def __init__(self, count: int) -> None:
        cmd = [sys.executable, str(loadgen.BENCH_DIR / "poll_sim.py"), "--backlog", str(count),
               "--fetch-latency", "0", "--auth-token", AUTH_TOKEN, "--day", DAY.isoformat(),
               "--export-job-delay", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"poll_sim.py printed no URL (exit code {self.proc.wait()})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


def _auth() -> dict[str, str]:
    basic = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    return {"Authorization": f"Basic {basic}"}


def _get(base: str, target: str, data: bytes | None = None) -> tuple[int, bytes]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=600)
    try:
        headers = {**_auth(), **({"Content-Type": "application/x-www-form-urlencoded"}
                                 if data else {})}
        conn.request("POST" if data else "GET", target, body=data, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def export_floor(sim: Sim) -> tuple[int, float]:
    """Lines of the day file and the seconds to download, decompress and parse them all."""
    day = DAY.isoformat()
    status, _ = _get(sim.url, "/v1/Exports/Messages/Days/" + day)
    if status == 404:  # no file yet: the job makes it (its delay is 0)
        form = urlencode({"StartDay": day, "EndDay": day, "FriendlyName": "bench floor"})
        _, job = _get(sim.url, "/v1/Exports/Messages/Jobs", form.encode())
        _get(sim.url, "/v1/Exports/Jobs/" + json.loads(job)["job_sid"])
    _, body = _get(sim.url, "/v1/Exports/Messages/Days/" + day)
    started = time.perf_counter()
    with urllib.request.urlopen(json.loads(body)["redirect_to"], timeout=600) as download, \
            gzip.GzipFile(fileobj=download) as lines:
        count = sum(1 for line in lines if orjson.loads(line))
    return count, time.perf_counter() - started


def list_floor(sim: Sim) -> tuple[int, float]:
    """Messages listed and the seconds to fetch and parse every page (the wait included:
    this is the whole of what reading the list costs)."""
    target: str | None = (f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?"
                          + urlencode({"DateSent": DAY.isoformat(), "PageSize": 1000}))
    count, started = 0, time.perf_counter()
    while target:
        _, body = _get(sim.url, target)
        page = orjson.loads(body)
        count += len(page["messages"])
        target = page["next_page_uri"]
    return count, time.perf_counter() - started


def daemon_env(sim: Sim) -> dict[str, str]:
    return {"MSGLEDGER_TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "MSGLEDGER_TWILIO_API_BASE_URL": sim.url,
            "MSGLEDGER_TWILIO_BULKEXPORTS_BASE_URL": sim.url,
            "MSGLEDGER_TWILIO_TIMEOUT": "120s",  # the simulator makes a 1 M file in one call
            "MSGLEDGER_API_TOKEN": API_TOKEN,
            "MSGLEDGER_RECONCILER_EXPORT_POLL_INTERVAL": "1s",
            # The poller must not fetch the stale 1 % meanwhile.
            "MSGLEDGER_POLLER_OVERDUE_AFTER": "400d", "MSGLEDGER_POLLER_GIVE_UP_AFTER": "400d"}


def run_case(case: str, sim: Sim, store: Path | None, workdir: Path) -> dict[str, Any]:
    """One daemon, one run of the day; its report and the daemon's peak RSS."""
    if store is not None:
        copy_store(store, workdir)
    with environment(daemon_env(sim)):
        target = targets.start("msgledger", workdir, PUBLIC_URL, AUTH_TOKEN, preload=None,
                               delay_us=0)
    try:
        source = "list" if case == "list" else "export"
        report = _reconcile(target.port, source)
        peak_mb = _peak_rss_mb(target.proc.pid)
    finally:
        exit_code = targets.stop(target)
    return {"case": case, "report": report, "peak_rss_mb": peak_mb, "exit_code": exit_code}


def _reconcile(port: int, source: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/reconcile", body=json.dumps(
            {"date": DAY.isoformat(), "source": source}), headers=headers)
        answer = conn.getresponse()
        started = json.loads(answer.read())
        if answer.status != 202:
            raise RuntimeError(f"POST /v1/reconcile answered {answer.status}: {started}")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(0.5)
            conn.request("GET", f"/v1/reconcile/runs/{started['run_id']}", headers=headers)
            report: dict[str, Any] = json.loads(conn.getresponse().read())
            if report["status"] in ("done", "incomplete", "failed"):
                return report
    finally:
        conn.close()
    raise RuntimeError(f"the run did not end within {RUN_TIMEOUT_S:g} s")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def figures(result: dict[str, Any], count: int, floor: tuple[int, float]) -> dict[str, Any]:
    report = result["report"]
    if report["status"] != "done" or report["duration_s"] is None:
        raise RuntimeError(f"the {result['case']} run ended {report['status']}:"
                           f" {report['reason']}")
    local = max(report["duration_s"] - report["waited_s"], 1e-9)
    floor_rate = floor[0] / floor[1]
    return {**result, "messages": count, "local_s": local, "rate": count / local,
            "floor_rate": floor_rate, "x_floor": (count / local) / floor_rate}


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'case':7} {'status':8} {'messages':>9} {'run s':>7} {'waited s':>8}"
          f" {'local s':>7} {'msgs/s':>9} {'floor/s':>9} {'x floor':>7} {'peak MB':>7}  counts")
    for r in rows:
        rep = r["report"]
        print(f"{r['case']:7} {rep['status']:8} {r['messages']:9d} {rep['duration_s']:7.1f}"
              f" {rep['waited_s']:8.1f} {r['local_s']:7.1f} {r['rate']:9.0f}"
              f" {r['floor_rate']:9.0f} {r['x_floor']:7.2f} {r['peak_rss_mb']:7.1f}"
              f"  {json.dumps(rep['counts'])}")
    print("\nTargets")
    for r in rows:
        need = TARGETS.get(r["case"])
        if need is not None:
            print(f"  [reconcile] {r['case']} >= {need:,.0f} msgs/s of local work"
                  f"{'':8} {r['rate']:10,.0f}/s   {'pass' if r['rate'] >= need else 'FAIL'}")
        ok = r["peak_rss_mb"] < RSS_LIMIT_MB
        print(f"  [reconcile] {r['case']} peak RSS < {RSS_LIMIT_MB:g} MB"
              f"{'':18} {r['peak_rss_mb']:7.1f} MB   {'pass' if ok else 'FAIL'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1_000_000, help="messages in the day")
    p.add_argument("--cases", default="export,list,import", help="which, comma-separated")
    p.add_argument("--keep", action="store_true", help="keep the stores and daemon logs")
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for an idle machine (a trial, not a measurement)")
    args = p.parse_args()
    cases = args.cases.split(",")
    out = OUT_DIR / f"reconcile-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"msgledger reconcile benchmark  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"  machine: {os.cpu_count()} cores; day {DAY}, {args.messages:,} messages,"
          f" 1 in {STALE_EVERY} stale in the store")
    store = out / "day.db"
    print(f"  store written in {build_store(store, args.messages):.1f} s")
    sim = Sim(args.messages)
    try:
        floors = {"export": export_floor(sim), "list": list_floor(sim)}
        for name, (lines, seconds) in floors.items():
            print(f"  baseline {name}: {lines:,} read in {seconds:.1f} s ="
                  f" {lines / seconds:,.0f}/s")
        rows = []
        for case in cases:
            quiet = "not waited for" if args.no_wait else f"at {wait_quiet():.2f} cores"
            print(f"  ... {case}: machine {quiet}; running", flush=True)
            result = run_case(case, sim, None if case == "import" else store, out / case)
            floor = floors["list" if case == "list" else "export"]
            rows.append(figures(result, args.messages, floor))
    finally:
        sim.stop()
    print_table(rows)
    path = OUT_DIR / f"reconcile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(rows, indent=1, default=str))
    print(f"\nJSON: {path}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
