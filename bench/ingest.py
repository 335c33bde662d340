"""Ingest benchmark: durable status callbacks per second, msgledger against two baselines.

    .venv/bin/python bench/ingest.py            # full run: both disks, three targets
    .venv/bin/python bench/ingest.py --quick    # a short smoke run
    .venv/bin/python bench/ingest.py --million  # msgledger only, RSS every 100k callbacks

For each disk mode (this disk as it is, then every fsync 2 ms slower through an LD_PRELOAD
shim) each target is started on a free port, warmed up, driven with unique signed callbacks
over 64 keep-alive connections for a fixed duration, stopped, and its store counted. The
figures are compared within the run, as ratios, against the targets of the issue. See
bench/README.md for what each figure means.

    .venv/bin/python bench/ingest.py --modes fast --paced 0 --targets msgledger,msgledger-nginx

puts the daemon behind nginx running deploy/nginx/msgledger.conf as shipped (TLS) in the
same run as the daemon alone. loadgen.c speaks plain HTTP only, so a run with a proxied
target drives every target with wrk (Debian's package) replaying the same pre-built
requests through a Lua script, plain HTTP to the daemon and TLS to the proxy.

`msgledger-inbound` (in the default targets) is the same daemon driven with signed inbound
messages, a fifth of them MMS whose file its media fetcher GETs from loadgen's C sink
meanwhile: its rate is compared with the status callbacks' of the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import loadgen
import targets
from loadgen import OUT_DIR, DriveResult, RequestSet

PUBLIC_URL = "https://ledger.example.com"  # as behind a TLS-terminating proxy
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"  # a made-up token, Twilio's format
RSS_SAMPLE_S = 0.5
MILLION = 1_000_000
SANITY_COMMITS = 200
P99_LIMIT_MS = 100.0
EMPTY_RATIO = 0.8
NAIVE_RATIO = {"fast": 1.0, "slow": 3.0}
PACED_S = 10.0  # seconds of the paced run after each closed-loop run
FLAT_RSS_GROWTH = 0.10  # "flat": RSS at 1M within 10 % of RSS at 200k (caches warm by then)
RSS_STEPS = 10  # --million prints RSS every tenth of the run: every 100k callbacks
PROXY_RATIO = 0.95  # issue 19: through the shipped nginx file >= 0.95 x the daemon alone
INBOUND_RATIO = 0.9  # inbound webhooks/s >= 0.9 x status callbacks/s: media off the path
QUIET_CORES = 0.1  # "other cores" at most this: nothing else competed during that round
GENERATORS = ("auto", "loadgen", "wrk")


@dataclass(frozen=True)
class Options:
    duration_s: float
    max_requests: int
    warmup: int
    conns: int
    modes: tuple[str, ...]
    targets: tuple[str, ...]
    delay_us: int
    keep: bool
    paced: float  # fraction of the closed-loop rate for the paced run; 0 = none
    rounds: int
    generator: str = "loadgen"  # "loadgen" (bench/loadgen.c) or "wrk" (TLS to a proxy)


@dataclass
class Figures:
    """One target under one disk mode."""

    target: str
    mode: str
    requests: int
    ok: int
    durable_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_200: dict[str, int]
    elapsed_s: float
    rss_mb_start: float
    rss_mb_max: float
    rss_mb_end: float
    server_cpu_us: float
    client_cpu_us: float
    other_cores: float  # CPU other processes used during the run, in cores
    steal_cores: float  # CPU the hypervisor took, in cores
    reconnects: int | None  # None: not known (wrk does not count them)
    pool_exhausted: bool
    worst_second: int | None  # None: not known (wrk gives no per-request record)
    ok_total: int = 0  # 200s including the warm-up and the paced run
    proxy_cpu_us: float | None = None  # the proxy's share of server_cpu_us, when proxied
    generator: str = "loadgen"
    rows: int | None = None
    exit_code: int | None = None
    journal: dict[str, float] = field(default_factory=dict)
    paced: dict[str, float] = field(default_factory=dict)
    rss_series: list[tuple[float, float]] = field(default_factory=list)
    media: dict[str, int] = field(default_factory=dict)  # inbound: targets.media_counts


@dataclass(frozen=True)
class Loads:
    """The pre-built request sets of a run, and the server standing in for Twilio's media."""

    status: RequestSet
    inbound: RequestSet | None = None
    media_base: str | None = None  # the sink the inbound MMS' MediaUrl0 point at

    def of(self, name: str) -> RequestSet:
        if targets.load_of(name) == "inbound":
            assert self.inbound is not None, "full_run builds them for an inbound target"
            return self.inbound
        return self.status

    def sets(self) -> list[RequestSet]:
        return [self.status] + ([self.inbound] if self.inbound else [])


# ------------------------------------------------------------------------ set-up


def build_shim() -> Path:
    src = loadgen.BENCH_DIR / "slowfsync.c"
    return loadgen.compile_c(src, OUT_DIR / "slowfsync.so", "-shared", "-fPIC", "-ldl")


SANITY_SCRIPT = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t (x)")
n = int(sys.argv[2]); t = time.perf_counter()
for i in range(n):
    db.execute("INSERT INTO t VALUES (?)", (i,))
print((time.perf_counter() - t) / n * 1000)
"""


def commit_ms(workdir: Path, preload: Path | None, delay_us: int) -> float:
    """Milliseconds per one-row SQLite commit (WAL, synchronous=FULL) on bench/out's disk."""
    db = workdir / f"sanity-{'slow' if preload else 'fast'}.db"
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env |= {"LD_PRELOAD": str(preload), "SLOWFSYNC_DELAY_US": str(delay_us)}
    cmd = [sys.executable, "-c", SANITY_SCRIPT, str(db), str(SANITY_COMMITS)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out)


def fs_of(path: Path) -> str:
    """The mount (device, mount point, type) holding `path`."""
    best = ("?", "/", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, kind = line.split()[:3]
        if str(path).startswith(mnt) and len(mnt) >= len(best[1]):
            best = (dev, mnt, kind)
    return f"{best[0]} on {best[1]} ({best[2]})"


def versions() -> dict[str, str]:
    names = ("hypercorn", "trio", "quart-trio", "flask", "gunicorn", "twilio", "msgledger")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    found["python"] = platform.python_version()
    found["sqlite"] = sqlite3.sqlite_version
    return found


def msgledger_runnable() -> bool:
    cmd = [str(targets.VENV_BIN / "msgledger"), "run", "--help"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ----------------------------------------------------------------------- figures


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def worst_second(result: DriveResult) -> int:
    """Fewest 200s completed in any whole second of the run (stalls show here)."""
    buckets: dict[int, int] = {}
    for done, status in zip(result.done_us, result.status, strict=True):
        if status == 200:
            buckets[done // 1_000_000] = buckets.get(done // 1_000_000, 0) + 1
    whole = range(int(result.elapsed_s))
    return min((buckets.get(s, 0) for s in whole), default=0)


def non_200(result: DriveResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in result.status:
        if status != 200:
            key = {0: "conn-error", 1: "unfinished"}.get(status, str(status))
            counts[key] = counts.get(key, 0) + 1
    return counts


@dataclass(frozen=True)
class Summary:
    """One drive, whichever generator ran it: what the table needs."""

    requests: int  # answers (and, with loadgen, connection errors) counted
    ok: int  # 200s (wrk: 2xx and 3xx)
    elapsed_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_200: dict[str, int]
    client_cpu_s: float
    reconnects: int | None = None  # loadgen only
    worst_second: int | None = None  # loadgen only


def summarize(run: DriveResult) -> Summary:
    lat = sorted(run.latency_us)
    return Summary(
        requests=len(run.status), ok=count_ok(run), elapsed_s=run.elapsed_s,
        p50_ms=percentile(lat, 0.50) / 1000, p99_ms=percentile(lat, 0.99) / 1000,
        max_ms=(lat[-1] if lat else 0) / 1000, non_200=non_200(run),
        client_cpu_s=run.client_cpu_s, reconnects=run.reconnects, worst_second=worst_second(run))


class RssSampler:
    """Samples the target's process-tree VmRSS every RSS_SAMPLE_S in a thread."""

    def __init__(self, *roots: int) -> None:
        self.roots = roots
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(RSS_SAMPLE_S)

    def sample(self) -> float:
        rss = targets.tree_rss_mb(*self.roots)
        self.samples.append((round(time.monotonic() - self._t0, 2), round(rss, 1)))
        return rss

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.sample()


# ------------------------------------------------------------------ the wrk generator

# loadgen.c speaks plain HTTP only. wrk (Debian's 4.1, LuaJIT) speaks TLS, and with this
# script it replays the same pre-built signed requests as loadgen: [first, first+count),
# each once, in order, over its connections with one request in flight each (wrk -t1).
# When they run out the thread stops (a spare GET, which the daemon would answer 405, fills
# the slot wrk asks for then). done() prints wrk's own counts and latency percentiles (µs).
WRK_SCRIPT = r"""
local reqs, n = {}, 0
local spare = "GET /twilio/status HTTP/1.1\r\nHost: ledger.example.com\r\n\r\n"

local function u64(s, i)
  local b1, b2, b3, b4, b5, b6, b7, b8 = s:byte(i * 8 + 1, i * 8 + 8)
  return b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
    + (b5 + b6 * 256 + b7 * 65536 + b8 * 16777216) * 4294967296
end

function init(args)
  local f = assert(io.open(args[1], "rb")); local data = f:read("*a"); f:close()
  f = assert(io.open(args[2], "rb")); local idx = f:read("*a"); f:close()
  local first, count = tonumber(args[3]), tonumber(args[4])
  local last = math.min(first + count, #idx / 8 - 1) - 1
  for i = first, last do
    reqs[#reqs + 1] = data:sub(u64(idx, i) + 1, u64(idx, i + 1))
  end
end

function request()
  n = n + 1
  if n > #reqs then
    wrk.thread:stop()
    return spare
  end
  return reqs[n]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk_result %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
WRK_TIMEOUT = "60s"  # wrk's default (2 s) would count a slow answer as an error


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk_drive(url: str, reqs: RequestSet, first: int, count: int, *, conns: int,
              duration_s: float) -> Summary:
    """Replay requests [first, first+count) at `url` with wrk for duration_s (whole seconds:
    wrk takes no fractions) or until they run out; wrk's own figures."""
    wrk = wrk_binary()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    script = OUT_DIR / "replay.lua"
    script.write_text(WRK_SCRIPT)
    cmd = [wrk, "-t1", f"-c{conns}", f"-d{max(1, math.ceil(duration_s))}s",
           "--timeout", WRK_TIMEOUT, "-s", str(script), url, "--", str(reqs.bin),
           str(reqs.idx), str(first), str(count)]
    cpu0 = _children_cpu()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    cpu = _children_cpu() - cpu0
    line = next((ln for ln in out.splitlines() if ln.startswith("wrk_result ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    n, dur, connect, read, write, status, timeout, p50, p99, top = map(
        float, line.split()[1:])
    errors = {"non-2xx": int(status), "conn-error": int(connect + read + write),
              "timeout": int(timeout)}
    return Summary(requests=int(n), ok=int(n - status), elapsed_s=dur / 1e6,
                   p50_ms=p50 / 1000, p99_ms=p99 / 1000, max_ms=top / 1000,
                   non_200={k: v for k, v in errors.items() if v}, client_cpu_s=cpu)


def wrk_warmup_s(count: int) -> float:
    """wrk runs for whole seconds even when the requests run out: about 400/s here."""
    return float(min(10, max(2, math.ceil(count / 400))))


# ----------------------------------------------------------------------- a target


@dataclass(frozen=True)
class Snapshot:
    """CPU and counters at one instant: the target's tree, the machine, msgledger's metrics."""

    server_cpu_s: float  # the server's trees and the proxy's
    proxy_cpu_s: float  # the proxy's alone (0 without one)
    machine_busy_s: float
    steal_s: float
    metrics: dict[str, float]

    @classmethod
    def take(cls, target: targets.Target) -> Snapshot:
        busy, steal = machine_cpu_s()
        proxy = targets.tree_cpu_s(target.proxy.proc.pid) if target.proxy else 0.0
        return cls(targets.tree_cpu_s(*target.roots()), proxy, busy, steal,
                   targets.metrics(target))


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq) and stolen."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / targets.CLOCK_TICKS, fields[7] / targets.CLOCK_TICKS


def drive(target: targets.Target, reqs: RequestSet, first: int, count: int, opts: Options,
          duration_s: float, tag: str, rate: float = 0.0) -> Summary:
    """One closed-loop (or, with loadgen, paced) drive at the target with opts.generator."""
    if opts.generator == "wrk":
        return wrk_drive(target.url, reqs, first, count, conns=opts.conns,
                         duration_s=duration_s)
    if target.proxy is not None:
        raise RuntimeError(f"{target.name}: loadgen cannot speak TLS; use --generator wrk")
    return summarize(loadgen.drive(target.port, reqs, first, count, conns=opts.conns,
                                   duration_s=duration_s, rate=rate, tag=tag))


def journal_time() -> str:
    """Now, as msgledger's journal writes times (`events.iso_utc`): ISO 8601 UTC, µs."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def measure(name: str, mode: str, loads: Loads, opts: Options, shim: Path,
            workdir: Path) -> Figures:
    """Start, warm up, drive (closed loop, then paced), stop and count one target."""
    preload = shim if mode == "slow" else None
    inbound = targets.load_of(name) == "inbound"
    reqs = loads.of(name)
    target = targets.start(name, workdir / mode / name, PUBLIC_URL, AUTH_TOKEN,
                           preload=preload, delay_us=opts.delay_us,
                           twilio_api=loads.media_base if inbound else None)
    paced: Summary | None = None
    try:
        warm_s = wrk_warmup_s(opts.warmup) if opts.generator == "wrk" else max(
            10.0, opts.duration_s)
        warm = drive(target, reqs, 0, opts.warmup, opts, warm_s, f"{name}-warm")
        before, started = Snapshot.take(target), journal_time()
        with RssSampler(*target.roots()).running() as rss:
            run = drive(target, reqs, opts.warmup, opts.max_requests, opts, opts.duration_s,
                        name)
            after, ended = Snapshot.take(target), journal_time()
        if opts.generator == "loadgen":  # wrk cannot pace
            paced = drive_paced(target, reqs, opts, opts.warmup + run.requests, run)
        drained_s = wait_for_media(target) if inbound else None
    finally:
        exit_code = targets.stop(target)
    ok_total = sum(r.ok for r in (warm, run, paced) if r is not None)
    result = figures(name, mode, run, rss.samples, before, after, opts)
    result.ok_total, result.exit_code = ok_total, exit_code
    result.rows = targets.stored_rows(target)
    result.paced = paced_figures(paced)
    if inbound:
        result.media = targets.media_counts(target, (started, ended))
        result.media["drained_ms"] = -1 if drained_s is None else round(drained_s * 1000)
    return result


MEDIA_DRAIN_S = 120.0  # after the load: time for the fetcher to fetch every file


def wait_for_media(target: targets.Target) -> float | None:
    """Seconds from the load's end until the store has no file left to fetch; None if
    files were still due after MEDIA_DRAIN_S."""
    start = time.monotonic()
    while time.monotonic() - start < MEDIA_DRAIN_S:
        if targets.media_still_due(target) == 0:
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def count_ok(run: DriveResult) -> int:
    return sum(1 for s in run.status if s == 200)


def drive_paced(target: targets.Target, reqs: RequestSet, opts: Options, first: int,
                closed: Summary) -> Summary | None:
    """Drive at opts.paced times the closed-loop rate just measured, for latency at load."""
    rate = opts.paced * closed.ok / closed.elapsed_s if closed.elapsed_s else 0.0
    duration = min(PACED_S, opts.duration_s)
    count = min(int(rate * duration) + opts.conns, reqs.count - first)
    if rate <= 0 or count < rate * duration:
        return None
    return drive(target, reqs, first, count, opts, duration, f"{target.name}-paced", rate)


def paced_figures(run: Summary | None) -> dict[str, float]:
    if run is None or not run.requests:
        return {}
    return {"rate": run.ok / run.elapsed_s, "p50_ms": run.p50_ms, "p99_ms": run.p99_ms,
            "non_200": run.requests - run.ok}


def journal_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Commits, mean batch and mean commit time during the measured run, from /metrics."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    commits = delta("msgledger_journal_batch_size_count")
    if not commits:
        return {}
    return {"commits": commits,
            "mean_batch": delta("msgledger_journal_batch_size_sum") / commits,
            "mean_commit_ms": delta("msgledger_journal_commit_seconds_sum") / commits * 1000}


def figures(name: str, mode: str, run: Summary, rss: list[tuple[float, float]],
            before: Snapshot, after: Snapshot, opts: Options) -> Figures:
    n = run.requests
    rss_values = [mb for _, mb in rss] or [0.0]
    server_cpu = after.server_cpu_s - before.server_cpu_s
    proxy_cpu = after.proxy_cpu_s - before.proxy_cpu_s
    machine = after.machine_busy_s - before.machine_busy_s
    elapsed = run.elapsed_s or 1.0
    return Figures(
        target=name, mode=mode, requests=n, ok=run.ok, durable_per_s=run.ok / elapsed,
        p50_ms=run.p50_ms, p99_ms=run.p99_ms, max_ms=run.max_ms, non_200=run.non_200,
        elapsed_s=run.elapsed_s,
        rss_mb_start=rss_values[0], rss_mb_max=max(rss_values), rss_mb_end=rss_values[-1],
        server_cpu_us=server_cpu / max(n, 1) * 1e6,
        client_cpu_us=run.client_cpu_s / max(n, 1) * 1e6,
        other_cores=max(0.0, (machine - server_cpu - run.client_cpu_s) / elapsed),
        steal_cores=(after.steal_s - before.steal_s) / elapsed,
        reconnects=run.reconnects, pool_exhausted=n >= opts.max_requests - opts.conns,
        worst_second=run.worst_second, journal=journal_figures(before.metrics, after.metrics),
        rss_series=rss, generator=opts.generator,
        proxy_cpu_us=proxy_cpu / max(n, 1) * 1e6 if targets.proxy_of(name) else None,
    )


def generator_ceiling(reqs: RequestSet, opts: Options) -> dict[str, float]:
    """The generator against loadgen's own C sink: what it can drive on this machine."""
    port = targets.free_port()
    sink = loadgen.start_sink(port)
    try:
        if opts.generator == "wrk":
            run = wrk_drive(f"http://127.0.0.1:{port}/", reqs, 0, reqs.count,
                            conns=opts.conns, duration_s=min(5.0, opts.duration_s))
        else:
            run = summarize(loadgen.drive(port, reqs, 0, reqs.count, conns=opts.conns,
                                          duration_s=min(5.0, opts.duration_s), tag="sink"))
    finally:
        sink.terminate()
        sink.wait()
    return {"requests_per_s": run.requests / run.elapsed_s,
            "client_cpu_us": run.client_cpu_s / max(run.requests, 1) * 1e6,
            "p99_ms": run.p99_ms}


# ------------------------------------------------------------------------ report


COLUMNS = (
    ("target", "{:<20}"), ("requests", "{:>8}"), ("durable/s", "{:>9}"), ("p50 ms", "{:>7}"),
    ("p99 ms", "{:>7}"), ("max ms", "{:>7}"), ("non-200", "{:>7}"), ("RSS MB", "{:>6}"),
    ("srv CPU us/req", "{:>14}"), ("gen CPU us/req", "{:>14}"), ("other cores", "{:>11}"),
    ("worst 1s", "{:>8}"), ("stored/200s", "{:>13}"),
)


def row(f: Figures) -> list[str]:
    stored = "-" if f.rows is None else f"{f.rows}/{f.ok_total}"
    return [f.target, str(f.requests), f"{f.durable_per_s:.0f}", f"{f.p50_ms:.1f}",
            f"{f.p99_ms:.1f}", f"{f.max_ms:.0f}", str(sum(f.non_200.values())),
            f"{f.rss_mb_max:.0f}", f"{f.server_cpu_us:.0f}", f"{f.client_cpu_us:.0f}",
            f"{f.other_cores:.2f}", "-" if f.worst_second is None else str(f.worst_second),
            stored]


def print_table(title: str, rows: list[Figures], rounds: dict[str, list[Figures]]) -> None:
    print(f"\n{title}")
    print("  ".join(fmt.format(name) for name, fmt in COLUMNS))
    for f in rows:
        print("  ".join(fmt.format(cell) for (_, fmt), cell in zip(COLUMNS, row(f), strict=True)))
    for f in rows:
        print_notes(f, rounds.get(f.target, [f]))


def print_notes(f: Figures, rounds: list[Figures]) -> None:
    if len(rounds) > 1:
        rates = ", ".join(f"{r.durable_per_s:.0f}" for r in rounds)
        print(f"  {f.target}: durable/s of the {len(rounds)} rounds: {rates} (median shown)")
    if f.paced:
        print(f"  {f.target} paced at {f.paced['rate']:.0f}/s: p50 {f.paced['p50_ms']:.1f} ms, "
              f"p99 {f.paced['p99_ms']:.1f} ms, non-200 {f.paced['non_200']:.0f}")
    if f.non_200:
        print(f"  {f.target} non-200: {f.non_200}")
    if f.proxy_cpu_us is not None:
        print(f"  {f.target}: {f.proxy_cpu_us:.0f} us/req of its srv CPU is the proxy's "
              "(TLS, proxying, access log)")
    if f.reconnects is not None and f.reconnects > f.requests // 2:
        print(f"  {f.target}: {f.reconnects} connections opened for {f.requests} requests "
              "(the server closes after each response)")
    if f.media:
        m = f.media
        print(f"  {f.target} media: {m['run_declared']} files received and "
              f"{m['run_archived']} archived during the run "
              f"({m['run_archived'] / (f.elapsed_s or 1):.0f}/s); in the journal at the end "
              f"{m['archived']} media_archived and {m['failed']} media_failed of "
              f"{m['declared']} files, {m['still_due']} messages still due; the last file"
              f" fetched {m['drained_ms'] / 1000:.1f} s after the load (-0.0: never)")
    if f.journal:
        print(f"  {f.target} journal: {f.journal['commits']:.0f} commits, "
              f"{f.journal['mean_batch']:.1f} callbacks a commit, "
              f"{f.journal['mean_commit_ms']:.2f} ms a commit (from its /metrics)")
    if f.pool_exhausted:
        print(f"  {f.target}: ran out of pre-built requests before --duration")
    if f.exit_code not in (0, None):
        print(f"  {f.target}: exited with {f.exit_code} after SIGTERM")
    if f.steal_cores > 0.05:
        print(f"  {f.target}: the hypervisor stole {f.steal_cores:.2f} cores during the run")


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def evaluate(mode: str, by_name: dict[str, Figures],
             rounds: dict[str, list[Figures]] | None = None) -> list[dict[str, Any]]:
    """The issue's targets for one disk mode, as measured ratios, for each msgledger."""
    checks: list[dict[str, Any]] = []
    for name, ml in by_name.items():
        if targets.kind_of(name)[0] == "msgledger":
            checks.extend(evaluate_one(mode, name, ml, by_name, rounds or {}))
    return checks


def quiet_rate(runs: list[Figures]) -> tuple[float, int] | None:
    """Median durable/s of the rounds nothing else competed in, and how many there were."""
    quiet = [f for f in runs if f.other_cores <= QUIET_CORES]
    return (median_round(quiet).durable_per_s, len(quiet)) if quiet else None


def evaluate_one(mode: str, name: str, ml: Figures, by_name: dict[str, Figures],
                 rounds: dict[str, list[Figures]]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    proxy = targets.proxy_of(name)
    if targets.load_of(name) == "inbound":
        twin = targets.status_twin(name)
        if twin in by_name:
            checks.extend(ratio_checks(mode, name, twin, INBOUND_RATIO, by_name, rounds))
        checks.append(media_check(mode, name, ml))
    elif proxy:
        direct = name.removesuffix(f"-{proxy}")
        if direct in by_name:
            checks.extend(ratio_checks(mode, name, direct, PROXY_RATIO, by_name, rounds))
    for baseline, need in (("empty", EMPTY_RATIO), ("empty-w2", EMPTY_RATIO),
                           ("naive", NAIVE_RATIO[mode])):
        if baseline in by_name and targets.load_of(name) == "status":
            ratio = ml.durable_per_s / by_name[baseline].durable_per_s
            checks.append(check(mode, f"{name} >= {need:g} x {baseline}", ratio,
                                ratio >= need, f"{ratio:.2f} x"))
    checks.append(check(mode, f"{name} p99 < {P99_LIMIT_MS:g} ms", ml.p99_ms,
                        ml.p99_ms < P99_LIMIT_MS, f"{ml.p99_ms:.1f} ms"))
    if ml.paced:
        p99 = ml.paced["p99_ms"]
        checks.append(check(mode, f"  (paced at {ml.paced['rate']:.0f}/s: p99 < "
                            f"{P99_LIMIT_MS:g} ms)", p99, p99 < P99_LIMIT_MS, f"{p99:.1f} ms"))
    stored = ml.rows is not None and ml.rows >= ml.ok_total
    checks.append(check(mode, f"{name} stored every 200", ml.rows, stored,
                        f"{ml.rows} rows / {ml.ok_total} 200s"))
    return checks


def ratio_checks(mode: str, name: str, base_name: str, need: float,
                 by_name: dict[str, Figures],
                 rounds: dict[str, list[Figures]]) -> list[dict[str, Any]]:
    """`name`'s durable/s >= need x `base_name`'s, median rounds; and over the quiet rounds
    only, when there were several."""
    ml, base = by_name[name], by_name[base_name]
    ratio = ml.durable_per_s / base.durable_per_s
    checks = [check(mode, f"{name} >= {need:g} x {base_name}", ratio, ratio >= need,
                    f"{ratio:.2f} x (p99 {ml.p99_ms:.0f} vs {base.p99_ms:.0f} ms)")]
    ours, theirs = quiet_rate(rounds.get(name, [])), quiet_rate(rounds.get(base_name, []))
    if len(rounds.get(name, [])) > 1 and ours and theirs:
        quiet = ours[0] / theirs[0]
        checks.append(check(mode, f"  (quiet rounds only, {ours[1]} and {theirs[1]})",
                            quiet, quiet >= need,
                            f"{quiet:.2f} x ({ours[0]:.0f} vs {theirs[0]:.0f}/s)"))
    return checks


def media_check(mode: str, name: str, ml: Figures) -> dict[str, Any]:
    """The fetcher fetched every file once the load eased (it yields to webhooks queueing
    on the journal, so during a saturating burst it may fetch none), and none failed: the
    inbound ratio says fetching stays off the webhook's path only if the files are fetched
    all the same."""
    archived, failed = ml.media.get("archived", 0), ml.media.get("failed", 0)
    declared, drained = ml.media.get("declared", 0), ml.media.get("drained_ms", -1)
    return check(mode, f"{name} fetched every file after", archived,
                 drained >= 0 and failed == 0 and archived == declared,
                 f"{archived}/{declared} in {drained / 1000:.1f} s after, {failed} failed")


def check(mode: str, name: str, value: Any, ok: bool, shown: str) -> dict[str, Any]:
    return {"mode": mode, "target": name, "value": value, "pass": ok, "shown": shown}


def print_checks(checks: list[dict[str, Any]]) -> None:
    print("\nTargets (ratios within this run)")
    for c in checks:
        print(f"  [{c['mode']:<4}] {c['target']:<42} {c['shown']:<28} {verdict(c['pass'])}")


def write_json(payload: dict[str, Any], name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = OUT_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# -------------------------------------------------------------------------- runs


def header(opts: Options, loads: Loads, sanity: dict[str, float],
           ceiling: dict[str, float], workdir: Path) -> None:
    reqs = loads.status
    print(f"msgledger ingest benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  machine: {os.cpu_count()} cores, {platform.platform()}")
    print(f"  versions: {', '.join(f'{k} {v}' for k, v in versions().items())}")
    print(f"  stores under {workdir}: {fs_of(workdir)}")
    print(f"  requests: {reqs.count} pre-built unique signed callbacks, {reqs.mean_bytes} B "
          f"each on the wire ({reqs.mean_body_bytes} B form body)")
    if loads.inbound is not None:
        inbound = loads.inbound
        print(f"  inbound targets: {inbound.count} pre-built unique signed inbound messages, "
              f"{inbound.mean_bytes} B each on the wire ({inbound.mean_body_bytes} B form "
              f"body), {inbound.with_media / inbound.count:.0%} MMS with one file at "
              f"{loads.media_base} (loadgen's C sink, an empty 200: the daemon's "
              "twilio.api_base_url), fetched by the daemon when webhooks leave it room")
    print(f"  load ({opts.generator}): {opts.conns} keep-alive connections, 1 request in "
          "flight each; "
          f"warm-up {opts.warmup} requests, then {opts.duration_s:g} s "
          f"(at most {opts.max_requests} requests) per target, {opts.rounds} round(s)")
    if opts.paced:
        print(f"  then {min(PACED_S, opts.duration_s):g} s paced at {opts.paced:.0%} of the "
              "target's own closed-loop rate (latency counted from each request's due time)")
    print(f"  fsync sanity (SQLite WAL synchronous=FULL, 1 row a commit): "
          f"{sanity['fast']:.2f} ms a commit as is, {sanity['slow']:.2f} ms with the "
          f"+{opts.delay_us} us shim")
    name = ("loadgen.c" if opts.generator == "loadgen"
            else "wrk -t1 replaying them (plain HTTP here)")
    print(f"  generator ceiling ({name} against loadgen's C sink): "
          f"{ceiling['requests_per_s']:.0f} req/s, {ceiling['client_cpu_us']:.0f} us CPU/req")
    if opts.generator == "wrk":
        print("  generator: wrk (loadgen.c speaks no TLS): plain HTTP to a bare server, TLS to "
              "a proxy, every target in this run; wrk counts no reconnects, keeps no "
              "per-request record (worst 1s: -) and cannot pace (no paced run)")
    for name in opts.targets:
        proxy = targets.proxy_of(name)
        if proxy:
            shipped = "deploy/nginx/msgledger.conf" if proxy == "nginx" else \
                "deploy/haproxy/msgledger.cfg"
            print(f"  {name}: the daemon behind {proxy} running {shipped} as shipped (listen "
                  "port, a self-signed P-256 certificate and the daemon's address "
                  "substituted), TLS from the generator")


def run_modes(opts: Options, loads: Loads, shim: Path, workdir: Path) -> dict[str, Any]:
    results: list[Figures] = []
    checks: list[dict[str, Any]] = []
    for mode in opts.modes:
        rounds: dict[str, list[Figures]] = {name: [] for name in opts.targets}
        for i in range(opts.rounds):
            for name in opts.targets:
                print(f"  ... {mode} disk, round {i + 1}: {name}", flush=True)
                rounds[name].append(measure(name, mode, loads, opts, shim, workdir / f"r{i}"))
        by_name = {name: median_round(runs) for name, runs in rounds.items()}
        results.extend(f for runs in rounds.values() for f in runs)
        title = ("fast disk: this machine's fsync" if mode == "fast"
                 else f"slow disk: every fsync +{opts.delay_us / 1000:g} ms (LD_PRELOAD shim)")
        print_table(title, list(by_name.values()), rounds)
        checks.extend(evaluate(mode, by_name, rounds))
    return {"results": [asdict(f) for f in results], "checks": checks}


def median_round(runs: list[Figures]) -> Figures:
    """The round with the median durable/s (the lower one of an even count)."""
    return sorted(runs, key=lambda f: f.durable_per_s)[(len(runs) - 1) // 2]


def full_run(opts: Options) -> None:
    workdir = OUT_DIR / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True)
    shim = build_shim()
    loadgen.loadgen_binary()
    sanity = {"fast": commit_ms(workdir, None, 0), "slow": commit_ms(workdir, shim, opts.delay_us)}
    pool = opts.warmup + opts.max_requests + (opts.max_requests // 2 if opts.paced else 0)
    reqs = loadgen.build_requests(pool, PUBLIC_URL, AUTH_TOKEN, "requests")
    ceiling = generator_ceiling(reqs, opts)
    with media_server(opts) as media_base:
        loads = Loads(reqs)
        if media_base is not None:  # the MediaUrl0 of the requests name the sink's port
            loads = Loads(reqs, loadgen.build_inbound_requests(
                pool, PUBLIC_URL, AUTH_TOKEN, "requests-inbound", media_base), media_base)
        header(opts, loads, sanity, ceiling, workdir)
        if not any(targets.kind_of(t)[0] == "msgledger" for t in opts.targets):
            print("  NOTE: msgledger not measured (not runnable or not selected): baselines only")
        payload = run_modes(opts, loads, shim, workdir)
    print_checks(payload["checks"])
    print("  [all ] flat RSS over a million callbacks     not measured in this run: --million")
    payload |= {"options": asdict(opts), "sanity_commit_ms": sanity, "ceiling": ceiling,
                "versions": versions(), "argv": sys.argv, "media_base": loads.media_base}
    print(f"\nJSON: {write_json(payload, 'ingest')}")
    cleanup(opts, workdir, *loads.sets())


@contextmanager
def media_server(opts: Options) -> Iterator[str | None]:
    """When an inbound target runs: loadgen's C sink on a free port for the whole run, as
    Twilio's API for the media fetcher (an empty 200 to every GET); its base URL."""
    if not any(targets.load_of(t) == "inbound" for t in opts.targets):
        yield None
        return
    port = targets.free_port()
    sink = loadgen.start_sink(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        sink.terminate()
        sink.wait()


def cleanup(opts: Options, workdir: Path, *request_sets: RequestSet) -> None:
    if opts.keep:
        print(f"kept {workdir} and {', '.join(str(r.bin) for r in request_sets)}")
        return
    shutil.rmtree(workdir, ignore_errors=True)
    for reqs in request_sets:
        reqs.bin.unlink(missing_ok=True)
        reqs.idx.unlink(missing_ok=True)


# ------------------------------------------------------------------------ million


def million_run(opts: Options, total: int, name: str) -> None:
    """Drive `total` callbacks at one target (msgledger); print RSS every tenth of them."""
    workdir = OUT_DIR / f"million-{time.strftime('%Y%m%d-%H%M%S')}"
    mode = opts.modes[0]
    shim = build_shim()
    print(f"building {total + opts.warmup} signed callbacks ...", flush=True)
    reqs = loadgen.build_requests(total + opts.warmup, PUBLIC_URL, AUTH_TOKEN, "requests-1m")
    target = targets.start(name, workdir, PUBLIC_URL, AUTH_TOKEN,
                           preload=shim if mode == "slow" else None, delay_us=opts.delay_us)
    series: list[dict[str, float]] = []
    try:
        loadgen.drive(target.port, reqs, 0, opts.warmup, conns=opts.conns, duration_s=60,
                      tag="1m-warm")
        series.append(rss_point(target, 0, 0.0))

        def on_progress(done: int, elapsed: float) -> None:
            series.append(rss_point(target, done, elapsed))

        run = loadgen.drive(target.port, reqs, opts.warmup, total, conns=opts.conns,
                            duration_s=0, progress_every=max(1, total // RSS_STEPS),
                            on_progress=on_progress, tag="1m")
    finally:
        exit_code = targets.stop(target)
    report_million(run, series, targets.stored_rows(target), exit_code, opts, total)
    cleanup(opts, workdir, reqs)


def rss_point(target: targets.Target, done: int, elapsed: float) -> dict[str, float]:
    rss = targets.tree_rss_mb(target.proc.pid)
    rate = done / elapsed if elapsed else 0.0
    print(f"  {done:>9} callbacks  {elapsed:7.1f} s  {rate:6.0f}/s  RSS {rss:6.1f} MB",
          flush=True)
    return {"callbacks": done, "elapsed_s": elapsed, "rss_mb": rss}


def report_million(run: DriveResult, series: list[dict[str, float]], rows: int | None,
                   exit_code: int | None, opts: Options, total: int) -> None:
    ok = sum(1 for s in run.status if s == 200)
    lat = sorted(run.latency_us)
    base = next((p for p in series if p["callbacks"] >= total // 5), series[0])
    growth = series[-1]["rss_mb"] / base["rss_mb"] - 1
    flat = growth <= FLAT_RSS_GROWTH
    print(f"\n{ok} of {len(run.status)} answered 200 in {run.elapsed_s:.0f} s "
          f"({ok / run.elapsed_s:.0f}/s), p50 {percentile(lat, .5) / 1000:.1f} ms, "
          f"p99 {percentile(lat, .99) / 1000:.1f} ms; {rows} rows stored (warm-up included)")
    print(f"RSS {base['rss_mb']:.1f} MB at {base['callbacks']:.0f} -> "
          f"{series[-1]['rss_mb']:.1f} MB at {series[-1]['callbacks']:.0f}: "
          f"{growth:+.1%}  flat (<= {FLAT_RSS_GROWTH:.0%}): {verdict(flat)}")
    payload = {"options": asdict(opts), "total": total, "ok": ok, "series": series,
               "rows": rows, "exit_code": exit_code, "rss_growth": growth, "flat": flat,
               "non_200": non_200(run), "p50_ms": percentile(lat, .5) / 1000,
               "p99_ms": percentile(lat, .99) / 1000, "versions": versions()}
    print(f"JSON: {write_json(payload, 'million')}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per target (20)")
    p.add_argument("--max-requests", type=int, default=60_000,
                   help="pre-built requests per target run, a cap (60000)")
    p.add_argument("--warmup", type=int, default=2_000, help="warm-up requests (2000)")
    p.add_argument("--conns", type=int, default=64, help="keep-alive connections (64)")
    p.add_argument("--modes", default="fast,slow", help="disk modes: fast,slow")
    p.add_argument("--targets", default="empty,naive,msgledger,msgledger-w2,msgledger-inbound",
                   help=f"which servers, of {','.join(targets.TARGETS)}")
    p.add_argument("--delay-us", type=int, default=2_000, help="extra µs per fsync (2000)")
    p.add_argument("--paced", type=float, default=0.5,
                   help="after each run, 10 s paced at this fraction of its rate (0.5; 0: no)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the targets this many times, report the median (1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 s, 300 warm-up")
    p.add_argument("--million", action="store_true",
                   help="1,000,000 callbacks at msgledger, RSS every 100k (10+ min)")
    p.add_argument("--million-total", type=int, default=MILLION, help=argparse.SUPPRESS)
    p.add_argument("--million-target", default="msgledger",
                   help="the target --million drives (msgledger)")
    p.add_argument("--keep", action="store_true", help="keep stores, logs and requests")
    p.add_argument("--generator", choices=GENERATORS, default="auto",
                   help="loadgen (plain HTTP) or wrk (TLS too); auto: wrk when a target is "
                        "behind a proxy, else loadgen")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.max_requests = 4.0, 300, 15_000
    return options(args), args


def options(args: argparse.Namespace) -> Options:
    names = tuple(t for t in args.targets.split(",") if t)
    unknown = set(names) - set(targets.TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {sorted(unknown)}")
    ours = {t for t in names if targets.kind_of(t)[0] == "msgledger"}
    if ours and not msgledger_runnable():
        print("msgledger run --help fails: measuring the baselines only", file=sys.stderr)
        names = tuple(t for t in names if t not in ours)
    for name in names:
        proxy = targets.proxy_of(name)
        if proxy and shutil.which(proxy, path=targets.SBIN_PATH) is None:
            raise SystemExit(f"{name}: {proxy} is not installed "
                             "(apt-get install -y nginx-light haproxy)")
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if any(targets.proxy_of(t) for t in names) else "loadgen"
    if generator == "loadgen" and any(targets.proxy_of(t) for t in names):
        raise SystemExit("loadgen speaks no TLS: a proxied target needs --generator wrk")
    paced = args.paced
    if generator == "wrk":
        if wrk_binary() is None:
            raise SystemExit("--generator wrk: wrk is not installed (apt-get install -y wrk)")
        if paced:
            print("wrk cannot pace: no paced run", file=sys.stderr)
        paced = 0.0
    return Options(args.duration, args.max_requests, args.warmup, args.conns,
                   tuple(m for m in args.modes.split(",") if m), names, args.delay_us,
                   args.keep, paced, max(1, args.rounds), generator)


def main(argv: list[str] | None = None) -> None:
    opts, args = parse_args(argv)
    if args.million:
        if args.million_target not in opts.targets:
            raise SystemExit(f"--million: {args.million_target} is not runnable")
        if targets.proxy_of(args.million_target):
            raise SystemExit("--million drives one server with loadgen: no proxied target")
        if targets.load_of(args.million_target) != "status":
            raise SystemExit("--million drives status callbacks: no inbound target")
        million_run(opts, args.million_total, args.million_target)
    else:
        full_run(opts)


if __name__ == "__main__":
    main()
