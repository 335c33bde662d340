"""The three servers under test, each started as its own process tree on 127.0.0.1.

- `msgledger`: the daemon, configured by environment variables only.
- `naive`: bench/naive_receiver.py, Flask under gunicorn with 2 sync workers.
- `empty`: bench/empty_app.py, a raw ASGI app on hypercorn's trio worker.

All of them read `X-Twilio-Signature` against the same fixed public URL, so one set of
pre-built requests serves every target and every port (as behind a reverse proxy).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 60.0  # msgledger may create its schema first
STOP_TIMEOUT_S = 60.0  # a graceful drain commits what is in flight
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = ("msgledger", "msgledger-w2", "msgledger-w3", "naive", "empty", "empty-w2")


def kind_of(name: str) -> tuple[str, int]:
    """`msgledger-w2` -> ("msgledger", 2): the server and how many processes serve HTTP."""
    kind, _, workers = name.partition("-w")
    return kind, int(workers or 1)


@dataclass
class Target:
    """A running server: its process, where it keeps its data and how to count rows."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    db_path: Path | None
    count_sql: str | None
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _base_env(preload: Path | None, delay_us: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(BENCH_DIR)
    env.pop("LD_PRELOAD", None)
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
        env["SLOWFSYNC_DELAY_US"] = str(delay_us)
    return env


def _command(name: str, port: int) -> list[str]:
    bind = f"127.0.0.1:{port}"
    kind, workers = kind_of(name)
    if kind == "msgledger":
        return [str(VENV_BIN / "msgledger"), "run"]
    if kind == "naive":
        return [str(VENV_BIN / "gunicorn"), "-w", "2", "-b", bind, "--pythonpath",
                str(BENCH_DIR), "naive_receiver:app"]
    if kind == "empty":
        return [str(VENV_BIN / "hypercorn"), "-k", "trio", "-w", str(workers), "-b", bind,
                "empty_app:app"]
    raise ValueError(name)


def _target_env(name: str, port: int, workdir: Path, public_url: str,
                token: str) -> tuple[dict[str, str], Path | None, str | None]:
    kind, workers = kind_of(name)
    if kind == "msgledger":
        db = workdir / f"{name}.db"
        env = {
            "MSGLEDGER_HTTP_WORKERS": str(workers),
            "MSGLEDGER_HTTP_LISTEN": f"127.0.0.1:{port}",
            "MSGLEDGER_HTTP_PUBLIC_URL": public_url,
            "MSGLEDGER_STORE_PATH": str(db),
            "MSGLEDGER_TWILIO_AUTH_TOKEN": token,
        }
        return env, db, "SELECT count(*) FROM journal"
    if name == "naive":
        db = workdir / "naive.db"
        env = {"NAIVE_DB": str(db), "NAIVE_PUBLIC_URL": public_url, "NAIVE_AUTH_TOKEN": token}
        return env, db, "SELECT count(*) FROM callbacks"
    return {}, None, None


def start(name: str, workdir: Path, public_url: str, token: str, *,
          preload: Path | None, delay_us: int) -> Target:
    """Start `name` on a free port with its stdout in workdir/<name>.log; wait for ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _base_env(preload, delay_us)
    extra, db, count_sql = _target_env(name, port, workdir, public_url, token)
    env.update(extra)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(_command(name, port), env=env, cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    target = Target(name, port, proc, workdir, db, count_sql, log_path, extra)
    _wait_ready(target)
    return target


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def metrics(target: Target) -> dict[str, float]:
    """msgledger's Prometheus counters and histogram sums ({} for the baselines)."""
    if kind_of(target.name)[0] != "msgledger":
        return {}
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except OSError:
        return {}
    finally:
        conn.close()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def _wait_ready(target: Target) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if target.proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited with {target.proc.returncode}; "
                               f"see {target.log_path}")
        try:
            if _get(target.port, "/healthz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    stop(target)
    raise RuntimeError(f"{target.name} not ready after {READY_TIMEOUT_S:g} s")


def stop(target: Target) -> int | None:
    """SIGTERM, wait for a graceful exit (SIGKILL after STOP_TIMEOUT_S); the exit code."""
    if target.proc.poll() is None:
        target.proc.send_signal(signal.SIGTERM)
        try:
            target.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(target.proc.pid, signal.SIGKILL)
            target.proc.wait()
    return target.proc.returncode


def stored_rows(target: Target) -> int | None:
    """Rows in the target's table after it stopped (None for the empty app)."""
    if target.db_path is None or target.count_sql is None or not target.db_path.exists():
        return None
    with sqlite3.connect(f"file:{target.db_path}?mode=ro", uri=True) as db:
        row = db.execute(target.count_sql).fetchone()
    return int(row[0])


# ---------------------------------------------------------------- process-tree figures


def _proc_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ppid = _stat_fields(int(entry.name))
            if ppid:
                children.setdefault(int(ppid[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(root: int) -> float:
    """VmRSS summed over the process and its descendants (gunicorn and hypercorn fork)."""
    return sum(_rss_kb(pid) for pid in _proc_tree(root)) / 1024


def tree_cpu_s(root: int) -> float:
    """User + system CPU of the live process tree, children already reaped included."""
    ticks = 0
    for pid in _proc_tree(root):
        fields = _stat_fields(pid)
        if fields:
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS

