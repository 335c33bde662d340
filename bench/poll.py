"""Poll benchmark: how fast the overdue poller drains a backlog, against concurrency / latency.

    .venv/bin/python bench/poll.py                      # 100,000 overdue messages, C = 4 and 32
    .venv/bin/python bench/poll.py --backlog 20000      # a shorter check, about 6 minutes

A store of `--backlog` messages, each with a SID, `sent` two days ago (past
`poller.overdue_after`, 12 h), is written once with the daemon's own journal writer and
copied for each concurrency C. Then, per C: the simulator (bench/poll_sim.py, its own
process) holds the same SIDs as `delivered` and answers each fetch after 50 ms; the daemon
starts on that copy with `poller.concurrency` = `twilio.concurrency` = C and an interval
long enough that only its first pass runs; loadgen.c posts signed status callbacks at
100/s meanwhile, over 16 connections. /metrics is scraped every 0.5 s until every message
has been polled.

The baseline, in the same run: the limit C / fetch latency (80/s at 4, 640/s at 32), the
rate of C fetches always in flight with nothing else costing time; and, under the table, the
simulator's own latency as a bare client sees it. The issue's targets are 0.9 of the limit
at 4 and 0.8 at 32, with the callbacks still answered. See bench/README.md, "Poll".
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ingest
import loadgen
import targets
from ingest import AUTH_TOKEN, PUBLIC_URL
from loadgen import OUT_DIR
from msgledger.events import Event
from msgledger.store import JournalWriter
from poll_sim import ACCOUNT_SID, backlog_sid

FETCH_LATENCY = 0.05  # seconds the simulator waits before answering a fetch (the issue's)
RATIO_NEEDED = {4: 0.9, 32: 0.8}  # the targets, as a fraction of the limit
CALLBACK_RATE = 100.0  # signed status callbacks a second during the drain: a modest stream
CALLBACK_CONNS = 16  # as Twilio posts: concurrently; 160 ms a callback before they queue
CHUNK_S = 5.0  # seconds of callbacks per loadgen run
CALLBACK_SEED = 1000  # chunk n is built with seed CALLBACK_SEED + n: unique, reproducible
CALLBACK_P99_MS = ingest.P99_LIMIT_MS  # "answered": every one 200, p99 under ingest's bound
BATCH = 1000  # register events per commit while the backlog is written
AGE = dt.timedelta(days=2)  # the backlog's sent_at: past overdue_after, before give_up_after
SCRAPE_S = 0.5  # seconds between scrapes of /metrics
TAIL_S = 5.0  # seconds of callbacks alone after the drain: what they cost the daemon
STALL_S = 60.0  # no poll answered for this long: the run is abandoned
PASS_LOG_WAIT_S = 30.0  # for the pass's `poll_pass` line once every message is polled
STEADY = (0.1, 0.9)  # the middle of the drain, as fractions of the backlog
SIM_STOP_S = 10.0
FLOOR_FETCHES = 40  # sequential fetches that measure the simulator's own latency (2 s)
QUIET_WAIT_S = 600.0  # at most this long for the machine to go idle before a run
QUIET_WINDOW_S = 3.0
POLLED = ("changed", "unchanged")  # the outcomes that count as a message drained


# ------------------------------------------------------------------------ the backlog


def register(i: int, at: str) -> Event:
    """The i-th backlog message as an app registers it: a SID, `sent`, long ago."""
    return Event("register", "register", at, sid=backlog_sid(i), status="sent",
                 data={"to": f"+1555{i % 10**7:07d}", "from": "+15005550006"})


def build_backlog(path: Path, count: int) -> float:
    """Write `count` overdue messages to a new store at `path`; the seconds it took."""
    started = time.perf_counter()
    at = (dt.datetime.now(dt.UTC) - AGE).isoformat(timespec="microseconds")
    writer = JournalWriter.open(str(path))
    try:
        for first in range(0, count, BATCH):
            writer.append([register(i, at) for i in range(first, min(count, first + BATCH))])
    finally:
        writer.close()
    return time.perf_counter() - started


def copy_store(source: Path, workdir: Path) -> None:
    """The backlog as targets.start's msgledger finds it (`<workdir>/msgledger.db`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", workdir / f"msgledger.db{suffix}")


# ------------------------------------------------------------------ the simulator


@dataclass
class Simulator:
    """bench/poll_sim.py running: its process, its base URL, its counters once stopped."""

    proc: subprocess.Popen[str]
    url: str
    stats: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, count: int) -> Simulator:
        cmd = [sys.executable, str(loadgen.BENCH_DIR / "poll_sim.py"), "--backlog", str(count),
               "--fetch-latency", f"{FETCH_LATENCY:g}", "--auth-token", AUTH_TOKEN]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            proc.kill()
            raise RuntimeError(f"poll_sim.py printed no URL (exit code {proc.wait()})")
        return cls(proc, url)

    def floor_ms(self, count: int) -> float:
        """Mean ms of `count` fetches one after another from a bare http.client: the
        simulator's own latency, with nothing of the daemon's client in it."""
        parts = urlsplit(self.url)
        auth = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=10)
        started = time.perf_counter()
        try:
            for i in range(count):
                conn.request("GET", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/"
                             f"{backlog_sid(i)}.json", headers={"Authorization": f"Basic {auth}"})
                conn.getresponse().read()
        finally:
            conn.close()
        return (time.perf_counter() - started) / count * 1000

    def stop(self) -> None:
        """SIGTERM; keep the counters it prints on the way out."""
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=SIM_STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in out.splitlines():
            if line.startswith("stats "):
                self.stats = json.loads(line.removeprefix("stats "))


# ---------------------------------------------------------------------- the daemon


def daemon_settings(concurrency: int, sim_url: str) -> dict[str, str]:
    """What the daemon gets on top of targets.start's own: the poller aimed at the simulator."""
    return {
        "MSGLEDGER_TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "MSGLEDGER_TWILIO_API_BASE_URL": sim_url,
        "MSGLEDGER_TWILIO_CONCURRENCY": str(concurrency),  # below C it would cap the poller
        "MSGLEDGER_POLLER_CONCURRENCY": str(concurrency),
        "MSGLEDGER_POLLER_OVERDUE_AFTER": "12h",
        "MSGLEDGER_POLLER_INTERVAL": "24h",  # only the pass at start-up runs
    }


@contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    """`extra` in os.environ meanwhile: targets.start hands its children a copy of it."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics, labelled ones included (`name{label="v"}` as the key)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    pairs = (line.rpartition(" ") for line in text.splitlines() if line[:1] not in ("", "#"))
    return {name: float(value) for name, _, value in pairs}


def polls(sample: dict[str, float], outcomes: tuple[str, ...] = POLLED) -> float:
    return sum(sample.get(f'msgledger_polls_total{{outcome="{o}"}}', 0.0) for o in outcomes)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`, keyed "<tid> <name>"."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        ticks = text.rsplit(")", 1)[1].split()[11:13]  # utime stime
        found[f"{task.name} {name}"] = sum(int(t) for t in ticks) / targets.CLOCK_TICKS
    return found


def pass_line(log_path: Path) -> dict[str, Any] | None:
    """The daemon's `poll_pass` log line (its tally), once the pass has logged it."""
    for line in log_path.read_text(errors="replace").splitlines():
        if '"poll_pass"' in line:
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return None


# ------------------------------------------------------------------- the callbacks


class CallbackStream:
    """Signed status callbacks at `rate` a second from a thread, until stopped: loadgen.c
    paces them over CALLBACK_CONNS keep-alive connections, CHUNK_S at a time (it runs for
    a count, not until told to stop), each chunk freshly built and unique.

    Latency counts from each request's due time, so a stall is not hidden. Each record is
    (due, latency in ms, HTTP status; 0: no answer), `due` on time.monotonic()'s clock.
    """

    def __init__(self, port: int, rate: float) -> None:
        self.port, self.rate = port, rate
        self.records: list[tuple[float, float, int]] = []
        self.client_cpu_s = 0.0  # loadgen's, every chunk
        self.span: tuple[float, float] = (0.0, 0.0)  # from the first chunk's start to now
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Let the chunk in progress finish; raise what the sending thread met, if anything."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the callback stream failed: {self.error}") from self.error

    def _run(self) -> None:
        count, chunk = round(self.rate * CHUNK_S), 0
        reqs: loadgen.RequestSet | None = None
        try:
            while not self._stop.is_set():
                chunk += 1
                reqs = loadgen.build_requests(count, PUBLIC_URL, AUTH_TOKEN, "poll-callbacks",
                                              seed=CALLBACK_SEED + chunk)
                started = time.monotonic()
                run = loadgen.drive(self.port, reqs, 0, count, conns=CALLBACK_CONNS,
                                    duration_s=0, rate=self.rate, tag="poll-callbacks")
                self.client_cpu_s += run.client_cpu_s
                self.span = (self.span[0] or started, time.monotonic())
                self.records.extend(
                    (started + (done - latency) / 1e6, latency / 1000, status)
                    for done, latency, status in zip(run.done_us, run.latency_us, run.status,
                                                     strict=True))
        except BaseException as error:  # raised again by stop(), in the main thread
            self.error = error
        finally:
            if reqs is not None:
                reqs.bin.unlink(missing_ok=True)
                reqs.idx.unlink(missing_ok=True)

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [r for r in self.records if start <= r[0] < end]

    @property
    def cores(self) -> float:
        """loadgen's CPU, in cores over the chunks run so far."""
        seconds = self.span[1] - self.span[0]
        return self.client_cpu_s / seconds if seconds > 0 else 0.0


# ------------------------------------------------------------------------ one run


@dataclass(frozen=True)
class Sample:
    """One scrape, and the CPU of everything involved at that instant."""

    at: float  # time.monotonic()
    metrics: dict[str, float]
    daemon_cpu_s: float
    sim_cpu_s: float
    own_cpu_s: float  # this process: the callback thread and the scrapes
    machine_busy_s: float
    steal_s: float

    @classmethod
    def take(cls, target: targets.Target, sim: Simulator) -> Sample:
        own = resource.getrusage(resource.RUSAGE_SELF)
        busy, steal = ingest.machine_cpu_s()
        return cls(time.monotonic(), scrape(target.port), targets.tree_cpu_s(target.proc.pid),
                   targets.tree_cpu_s(sim.proc.pid), own.ru_utime + own.ru_stime, busy, steal)


@dataclass
class Figures:
    """One concurrency's drain."""

    concurrency: int
    backlog: int
    limit_per_s: float
    drain_s: float  # the pass, from its own log line (the scrapes' estimate if none)
    polls_per_s: float
    steady_per_s: float  # over the middle of the drain (STEADY)
    cpu_ms_per_poll: float  # the daemon's CPU during the drain / polls, callbacks included
    cpu_ms_per_poll_net: float  # less what the callbacks alone cost (the tail)
    daemon_cores: float
    main_thread_cores: float  # the daemon's event loop thread
    threads: dict[str, float]  # the daemon's busiest threads, in cores during the drain
    thread_count: int  # threads the daemon ran besides its main one
    sim_cores: float
    bench_cores: float  # this script and its loadgen
    other_cores: float
    steal_cores: float
    fetch_mean_ms: float  # msgledger_twilio_fetch_seconds: the thread hop included
    fetch_over_100ms: float  # the share of fetches that took longer than 100 ms
    cycle_ms: float  # a worker's time per message: C / steady rate
    journal: dict[str, float]
    callbacks_ok: int
    callbacks_total: int
    callbacks_p50_ms: float
    callbacks_p99_ms: float
    callback_tail_cores: float  # the daemon's CPU with only the callbacks running
    outcomes: dict[str, float]
    pass_log: dict[str, Any] | None
    sim_stats: dict[str, int]
    exit_code: int | None = None
    sim_floor_ms: float = 0.0  # one fetch from a bare client, before the daemon started


def drain(target: targets.Target, sim: Simulator, count: int) -> list[Sample]:
    """Scrape until `count` polls are answered; every sample taken."""
    samples = [Sample.take(target, sim)]
    progress_at = samples[0].at
    while polls(samples[-1].metrics) < count:
        time.sleep(SCRAPE_S)
        if target.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {target.proc.returncode}; "
                               f"see {target.log_path}")
        samples.append(Sample.take(target, sim))
        if polls(samples[-1].metrics) > polls(samples[-2].metrics):
            progress_at = samples[-1].at
        elif samples[-1].at - progress_at > STALL_S:
            raise RuntimeError(f"no poll answered for {STALL_S:g} s; see {target.log_path}")
    return samples


def wait_for_pass(target: targets.Target) -> dict[str, Any] | None:
    deadline = time.monotonic() + PASS_LOG_WAIT_S
    while (found := pass_line(target.log_path)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def wait_quiet() -> float:
    """Wait (QUIET_WAIT_S at most) until the rest of the machine is idle; the cores it used
    over the last QUIET_WINDOW_S. Tests of other engineers share these two cores."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        busy0, _ = ingest.machine_cpu_s()
        time.sleep(QUIET_WINDOW_S)
        cores = (ingest.machine_cpu_s()[0] - busy0) / QUIET_WINDOW_S
        if cores <= ingest.QUIET_CORES or time.monotonic() > deadline:
            return cores


def measure(concurrency: int, count: int, store: Path, workdir: Path) -> Figures:
    """Start the simulator and the daemon on a copy of the backlog; drain it; stop both."""
    copy_store(store, workdir)
    sim = Simulator.start(count)
    try:
        floor_ms = sim.floor_ms(FLOOR_FETCHES)
        with environment(daemon_settings(concurrency, sim.url)):
            target = targets.start("msgledger", workdir, PUBLIC_URL, AUTH_TOKEN,
                                   preload=None, delay_us=0)
        stream = CallbackStream(target.port, CALLBACK_RATE)
        try:
            stream.start()
            try:
                threads0 = thread_cpu(target.proc.pid)
                samples = drain(target, sim, count)
                threads1 = thread_cpu(target.proc.pid)
                pass_log = wait_for_pass(target)
                tail0 = Sample.take(target, sim)
                time.sleep(TAIL_S)
                tail1 = Sample.take(target, sim)
            finally:
                stream.stop()
        finally:
            exit_code = targets.stop(target)
    finally:
        sim.stop()
    result = figures(concurrency, count, samples, (tail0, tail1), stream, pass_log,
                     thread_delta(threads0, threads1, samples[-1].at - samples[0].at),
                     target.proc.pid)
    result.sim_stats, result.exit_code, result.sim_floor_ms = sim.stats, exit_code, floor_ms
    return result


def thread_delta(before: dict[str, float], after: dict[str, float],
                 seconds: float) -> dict[str, float]:
    """Each thread's CPU between the two readings, in cores, busiest first."""
    cores = {name: (cpu - before.get(name, 0.0)) / seconds for name, cpu in after.items()}
    return dict(sorted(cores.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------- figures


def crossing(samples: list[Sample], level: float) -> float:
    """When the polls answered reached `level`, interpolated between two scrapes."""
    for a, b in itertools.pairwise(samples):
        pa, pb = polls(a.metrics), polls(b.metrics)
        if pa >= level:
            return a.at
        if pb >= level:
            return a.at + (b.at - a.at) * (level - pa) / (pb - pa)
    return samples[-1].at


def share_over(first: dict[str, float], last: dict[str, float], name: str,
               edge: str) -> float:
    """The fraction of a histogram's observations between two scrapes above bucket `edge`
    (its buckets are too coarse around 50 ms for a median)."""
    def delta(key: str) -> float:
        return last.get(key, 0.0) - first.get(key, 0.0)

    total = delta(f"{name}_count")
    return 1 - delta(f'{name}_bucket{{le="{edge}"}}') / total if total else float("nan")


def figures(concurrency: int, count: int, samples: list[Sample], tail: tuple[Sample, Sample],
            stream: CallbackStream, pass_log: dict[str, Any] | None,
            threads: dict[str, float], main_tid: int) -> Figures:
    first, last = samples[0], samples[-1]
    seconds = last.at - first.at
    done = polls(last.metrics) - polls(first.metrics)
    drain_s = float(pass_log["seconds"]) if pass_log else crossing(samples, count) - first.at
    low, high = (crossing(samples, count * f) for f in STEADY)
    steady = count * (STEADY[1] - STEADY[0]) / (high - low)
    daemon_cpu = last.daemon_cpu_s - first.daemon_cpu_s
    tail_cores = (tail[1].daemon_cpu_s - tail[0].daemon_cpu_s) / (tail[1].at - tail[0].at)
    sim_cpu, own_cpu = last.sim_cpu_s - first.sim_cpu_s, last.own_cpu_s - first.own_cpu_s
    own_cpu += stream.cores * seconds  # and loadgen's, sending the callbacks
    busy = last.machine_busy_s - first.machine_busy_s
    fetch = "msgledger_twilio_fetch_seconds"
    fetches = last.metrics.get(f"{fetch}_count", 0.0) - first.metrics.get(f"{fetch}_count", 0.0)
    fetch_sum = last.metrics.get(f"{fetch}_sum", 0.0) - first.metrics.get(f"{fetch}_sum", 0.0)
    answered = stream.between(first.at, last.at)
    latencies = sorted(int(r[1] * 1000) for r in answered)  # µs, for ingest.percentile
    outcomes = {k.split('"')[1]: v for k, v in last.metrics.items()
                if k.startswith("msgledger_polls_total{")}
    return Figures(
        concurrency=concurrency, backlog=count, limit_per_s=concurrency / FETCH_LATENCY,
        drain_s=drain_s, polls_per_s=count / drain_s, steady_per_s=steady,
        cpu_ms_per_poll=daemon_cpu / max(done, 1) * 1000,
        cpu_ms_per_poll_net=(daemon_cpu - tail_cores * seconds) / max(done, 1) * 1000,
        daemon_cores=daemon_cpu / seconds,
        main_thread_cores=sum(v for k, v in threads.items() if k.split()[0] == str(main_tid)),
        threads=dict(list(threads.items())[:8]), thread_count=len(threads) - 1,
        sim_cores=sim_cpu / seconds, bench_cores=own_cpu / seconds,
        other_cores=max(0.0, (busy - daemon_cpu - sim_cpu - own_cpu) / seconds),
        steal_cores=(last.steal_s - first.steal_s) / seconds,
        fetch_mean_ms=fetch_sum / max(fetches, 1) * 1000,
        fetch_over_100ms=share_over(first.metrics, last.metrics, fetch, "0.1"),
        cycle_ms=concurrency / steady * 1000,
        journal=ingest.journal_figures(first.metrics, last.metrics),
        callbacks_ok=sum(1 for r in answered if r[2] == 200), callbacks_total=len(answered),
        callbacks_p50_ms=ingest.percentile(latencies, 0.5) / 1000,
        callbacks_p99_ms=ingest.percentile(latencies, 0.99) / 1000,
        callback_tail_cores=tail_cores, outcomes=outcomes, pass_log=pass_log, sim_stats={})



# ------------------------------------------------------------------------ report


COLUMNS = (
    ("C", "{:>3}"), ("limit/s", "{:>7}"), ("polls/s", "{:>7}"), ("x limit", "{:>7}"),
    ("steady/s", "{:>8}"), ("drain s", "{:>7}"), ("CPU ms/poll", "{:>11}"), ("net", "{:>4}"),
    ("daemon cores", "{:>12}"), ("loop cores", "{:>10}"), ("fetch ms", "{:>8}"),
    ("cycle ms", "{:>8}"), ("callbacks 200/total", "{:>19}"), ("cb p50 ms", "{:>9}"),
    ("cb p99 ms", "{:>9}"), ("other cores", "{:>11}"),
)


def row(f: Figures) -> list[str]:
    return [str(f.concurrency), f"{f.limit_per_s:.0f}", f"{f.polls_per_s:.1f}",
            f"{f.polls_per_s / f.limit_per_s:.3f}", f"{f.steady_per_s:.1f}", f"{f.drain_s:.1f}",
            f"{f.cpu_ms_per_poll:.2f}", f"{f.cpu_ms_per_poll_net:.2f}", f"{f.daemon_cores:.2f}",
            f"{f.main_thread_cores:.2f}", f"{f.fetch_mean_ms:.1f}", f"{f.cycle_ms:.1f}",
            f"{f.callbacks_ok}/{f.callbacks_total}", f"{f.callbacks_p50_ms:.1f}",
            f"{f.callbacks_p99_ms:.1f}", f"{f.other_cores:.2f}"]


def print_table(results: list[Figures]) -> None:
    print(f"\nbacklog {results[0].backlog} overdue messages, fetch latency "
          f"{FETCH_LATENCY * 1000:g} ms, callbacks at {CALLBACK_RATE:g}/s")
    print("  ".join(fmt.format(name) for name, fmt in COLUMNS))
    for f in results:
        print("  ".join(fmt.format(c) for (_, fmt), c in zip(COLUMNS, row(f), strict=True)))
    for f in results:
        print_notes(f)


def print_notes(f: Figures) -> None:
    c = f"  C={f.concurrency}:"
    busiest = ", ".join(f"{name} {cores:.2f}" for name, cores in list(f.threads.items())[:4])
    print(f"{c} daemon's busiest threads (cores): {busiest}; its {f.thread_count} threads "
          f"other than the event loop's {f.daemon_cores - f.main_thread_cores:.2f} together")
    print(f"{c} simulator {f.sim_cores:.2f} cores, this script and loadgen "
          f"{f.bench_cores:.2f}, other {f.other_cores:.2f}, stolen {f.steal_cores:.2f}; "
          f"fetches in flight at the simulator at most {f.sim_stats.get('peak_in_flight', '?')}")
    floor = f.concurrency / f.sim_floor_ms * 1000
    print(f"{c} the simulator answers a bare client in {f.sim_floor_ms:.2f} ms: at that latency "
          f"the limit is {floor:.1f}/s, and the drain made {f.polls_per_s / floor:.3f} x that")
    print(f"{c} fetch mean {f.fetch_mean_ms:.1f} ms, {f.fetch_over_100ms:.1%} over 100 ms; a "
          f"worker's cycle {f.cycle_ms:.1f} ms, so {f.cycle_ms - f.fetch_mean_ms:.1f} ms a "
          "message outside the fetch (journal wait, scheduling)")
    if f.journal:
        print(f"{c} journal {f.journal['commits']:.0f} commits, {f.journal['mean_batch']:.1f} "
              f"events a commit, {f.journal['mean_commit_ms']:.2f} ms a commit")
    print(f"{c} callbacks alone cost the daemon {f.callback_tail_cores:.2f} cores (the "
          f"{TAIL_S:g} s after the drain): {f.cpu_ms_per_poll_net:.2f} ms/poll without them")
    print(f"{c} outcomes {f.outcomes}; pass: {tally(f.pass_log)}")
    if f.exit_code not in (0, None):
        print(f"{c} the daemon exited with {f.exit_code} after SIGTERM")


def tally(pass_log: dict[str, Any] | None) -> str:
    if pass_log is None:
        return "no poll_pass line logged"
    keys = ("due", "polled", "changed", "flagged", "deferred", "not_journaled", "seconds")
    return ", ".join(f"{k} {pass_log.get(k)}" for k in keys)


def checks(results: list[Figures]) -> list[dict[str, Any]]:
    found = []
    for f in results:
        ratio = f.polls_per_s / f.limit_per_s
        need = RATIO_NEEDED.get(f.concurrency)
        if need is not None:
            found.append(ingest.check("poll", f"C={f.concurrency} >= {need:g} x limit "
                                      f"({f.limit_per_s:.0f}/s)", ratio, ratio >= need,
                                      f"{ratio:.3f} x ({f.polls_per_s:.1f}/s)"))
        answered = f.callbacks_ok == f.callbacks_total > 0
        ok = answered and f.callbacks_p99_ms < CALLBACK_P99_MS
        found.append(ingest.check("poll", f"C={f.concurrency} callbacks all 200, "
                                  f"p99 < {CALLBACK_P99_MS:g} ms", f.callbacks_p99_ms, ok,
                                  f"{f.callbacks_ok}/{f.callbacks_total}, "
                                  f"p99 {f.callbacks_p99_ms:.1f} ms"))
    return found


def header(count: int, built_s: float, store: Path) -> None:
    print(f"msgledger poll benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  machine: {os.cpu_count()} cores, {platform.platform()}")
    print(f"  versions: {', '.join(f'{k} {v}' for k, v in ingest.versions().items())}")
    print(f"  store under {store.parent}: {ingest.fs_of(store)}")
    print(f"  backlog: {count} messages with a SID, sent {AGE.days} days ago, written with "
          f"JournalWriter in {built_s:.1f} s ({store.stat().st_size / 2**20:.0f} MB), "
          "copied for each run")
    print(f"  simulator (bench/poll_sim.py, its own process): the same SIDs delivered, "
          f"fetch latency {FETCH_LATENCY * 1000:g} ms")
    print(f"  daemon: poller.concurrency = twilio.concurrency = C, one pass; /metrics every "
          f"{SCRAPE_S:g} s; {CALLBACK_RATE:g} signed callbacks/s over {CALLBACK_CONNS} "
          "connections (loadgen.c, paced; latency from each one's due time)")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backlog", type=int, default=100_000, help="overdue messages (100000)")
    p.add_argument("--concurrency", default="4,32",
                   help="poller concurrencies to run, in order (4,32)")
    p.add_argument("--keep", action="store_true", help="keep the stores and the daemons' logs")
    args = p.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = OUT_DIR / f"poll-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True)
    store = workdir / "backlog.db"
    built_s = build_backlog(store, args.backlog)
    header(args.backlog, built_s, store)
    results = []
    for concurrency in args.concurrencies:
        print(f"  ... C={concurrency}: draining {args.backlog} (the limit "
              f"{concurrency / FETCH_LATENCY:.0f}/s: at least "
              f"{args.backlog * FETCH_LATENCY / concurrency:.0f} s)", flush=True)
        busy = wait_quiet()
        if busy > ingest.QUIET_CORES:
            print(f"    the machine is busy ({busy:.2f} cores) without us: figures suspect")
        results.append(measure(concurrency, args.backlog, store, workdir / f"c{concurrency}"))
        print("    " + "  ".join(row(results[-1])), flush=True)
    print_table(results)
    found = checks(results)
    ingest.print_checks(found)
    payload = {"results": [asdict(f) for f in results], "checks": found,
               "versions": ingest.versions(), "argv": sys.argv, "backlog_build_s": built_s}
    print(f"\nJSON: {ingest.write_json(payload, 'poll')}")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
