"""The three servers under test, each started as its own process tree on 127.0.0.1.

- `msgledger`: the daemon, configured by environment variables only.
- `naive`: bench/naive_receiver.py, Flask under gunicorn with 2 sync workers.
- `empty`: bench/empty_app.py, a raw ASGI app on hypercorn's trio worker.

A `-nginx` or `-haproxy` suffix (`msgledger-nginx`, `msgledger-w2-nginx`) puts the daemon
behind that proxy running the shipped deploy/ file, only its placeholders substituted (the
listen port, a throwaway self-signed certificate, the daemon's address): the generator then
speaks TLS to the proxy, as Twilio does.

An `-inbound` suffix (`msgledger-inbound`, `msgledger-w2-inbound`) is the same daemon driven
with inbound messages (`POST /twilio/inbound`) instead of status callbacks; its Twilio API
base URL is the caller's media server, so the media fetcher works during the run.

All of them read `X-Twilio-Signature` against the same fixed public URL, so one set of
pre-built requests serves every target and every port (as behind a reverse proxy).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"

BENCH_DIR = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 60.0  # msgledger may create its schema first
STOP_TIMEOUT_S = 60.0  # a graceful drain commits what is in flight
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROXIES = ("nginx", "haproxy")
LOADS = ("inbound",)  # a target name's suffix for a load other than status callbacks
TARGETS = ("msgledger", "msgledger-w2", "msgledger-w3", "msgledger-nginx", "msgledger-w2-nginx",
           "msgledger-haproxy", "msgledger-w2-haproxy", "msgledger-inbound",
           "msgledger-w2-inbound", "naive", "empty", "empty-w2")
INBOUND_COUNT_SQL = "SELECT count(*) FROM journal WHERE kind = 'inbound_received'"
# What the media fetcher did, from the journal: files declared by the inbound messages,
# files archived and failures (all the store holds), files still due at the end.
MEDIA_SQL = {
    "declared": "SELECT coalesce(sum(json_array_length(data, '$.media')), 0) FROM journal"
                " WHERE kind = 'inbound_received'",
    "archived": "SELECT count(*) FROM journal WHERE kind = 'media_archived'",
    "failed": "SELECT count(*) FROM journal WHERE kind = 'media_failed'",
    "still_due": "SELECT count(*) FROM messages WHERE media_due IS NOT NULL",
}
# The same within a time window (the journal's `at`, ISO 8601 UTC): the measured run.
MEDIA_WINDOW_SQL = {
    "declared": "SELECT coalesce(sum(json_array_length(data, '$.media')), 0) FROM journal"
                " WHERE kind = 'inbound_received' AND at BETWEEN ? AND ?",
    "archived": "SELECT count(*) FROM journal WHERE kind = 'media_archived'"
                " AND at BETWEEN ? AND ?",
}
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _suffix(name: str, choices: tuple[str, ...]) -> tuple[str, str | None]:
    """`name` without its last `-part` when that part is one of `choices`, and the part."""
    rest, _, last = name.rpartition("-")
    return (rest, last) if rest and last in choices else (name, None)


def proxy_of(name: str) -> str | None:
    """`msgledger-w2-nginx` -> "nginx": the proxy in front, or None."""
    return _suffix(name, PROXIES)[1]


def load_of(name: str) -> str:
    """`msgledger-w2-inbound` -> "inbound": what the target is driven with ("status":
    status callbacks)."""
    return _suffix(_suffix(name, PROXIES)[0], LOADS)[1] or "status"


def status_twin(name: str) -> str:
    """`msgledger-w2-inbound` -> `msgledger-w2`: the same target driven with status
    callbacks (the name itself when it is one)."""
    base, proxy = _suffix(name, PROXIES)
    return _suffix(base, LOADS)[0] + (f"-{proxy}" if proxy else "")


def kind_of(name: str) -> tuple[str, int]:
    """`msgledger-w2` -> ("msgledger", 2): the server and how many processes serve HTTP."""
    kind, _, workers = _suffix(status_twin(name), PROXIES)[0].partition("-w")
    return kind, int(workers or 1)


@dataclass
class Proxy:
    """nginx or HAProxy in front of a target, on its own port, speaking TLS."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path


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
    proxy: Proxy | None = None

    @property
    def url(self) -> str:
        """Where the load goes: the proxy's TLS port, or the server itself."""
        if self.proxy is not None:
            return f"https://127.0.0.1:{self.proxy.port}/"
        return f"http://127.0.0.1:{self.port}/"

    def roots(self) -> list[int]:
        """The process trees that serve this target: the server's, and the proxy's."""
        return [self.proc.pid] + ([self.proxy.proc.pid] if self.proxy else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _base_env(preload: Path | None, delay_us: int) -> dict[str, str]:
    env = dict(os.environ)
    # A PYTHONPATH given to the bench goes first: a worktree's daemon/ benches an old commit.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                      str(BENCH_DIR)]))
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


def _target_env(name: str, port: int, workdir: Path, public_url: str, token: str,
                twilio_api: str | None) -> tuple[dict[str, str], Path | None, str | None]:
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
        if twilio_api is not None:  # where the media fetcher GETs the files
            env["MSGLEDGER_TWILIO_API_BASE_URL"] = twilio_api
        if load_of(name) == "inbound":  # the webhooks' rows, not the fetcher's
            return env, db, INBOUND_COUNT_SQL
        return env, db, "SELECT count(*) FROM journal"
    if name == "naive":
        db = workdir / "naive.db"
        env = {"NAIVE_DB": str(db), "NAIVE_PUBLIC_URL": public_url, "NAIVE_AUTH_TOKEN": token}
        return env, db, "SELECT count(*) FROM callbacks"
    return {}, None, None


def start(name: str, workdir: Path, public_url: str, token: str, *,
          preload: Path | None, delay_us: int, twilio_api: str | None = None) -> Target:
    """Start `name` on a free port with its stdout in workdir/<name>.log; wait for ready.
    `twilio_api`: msgledger's Twilio API base URL (its media fetcher's origin)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _base_env(preload, delay_us)
    extra, db, count_sql = _target_env(name, port, workdir, public_url, token, twilio_api)
    env.update(extra)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(_command(name, port), env=env, cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    target = Target(name, port, proc, workdir, db, count_sql, log_path, extra)
    _wait_ready(target)
    proxy = proxy_of(name)
    if proxy is not None:
        try:
            target.proxy = start_proxy(proxy, workdir, f"127.0.0.1:{port}")
        except BaseException:
            stop(target)
            raise
    return target


# ------------------------------------------------------------------ the proxy in front


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace the shipped file's placeholders; each must be in a setting, not a comment."""
    settings = [line.split("#", 1)[0] for line in text.splitlines()]
    for old, new in replacements.items():
        if not any(old in line for line in settings):
            raise RuntimeError(f"placeholder {old!r} is no longer in the shipped file")
        text = text.replace(old, new)
    return text


def _self_signed(workdir: Path) -> tuple[Path, Path]:
    """A throwaway certificate for the public host, and its key (openssl, P-256)."""
    cert, key = workdir / "proxy-cert.pem", workdir / "proxy-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=ledger.example.com", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def _proxy_binary(name: str) -> str:
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        raise RuntimeError(f"{name} is not installed (apt-get install -y nginx-light haproxy)")
    return found


def _nginx_command(workdir: Path, port: int, upstream: str) -> list[str]:
    """deploy/nginx/msgledger.conf, substituted, in an nginx.conf shaped like Debian's
    (worker_processes auto, worker_connections 768, an access log) with every file it
    writes in workdir."""
    cert, key = _self_signed(workdir)
    site = substitute((DEPLOY_DIR / "nginx" / "msgledger.conf").read_text(), {
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "/etc/ssl/msgledger/fullchain.pem": str(cert),
        "/etc/ssl/msgledger/privkey.pem": str(key),
        "server 127.0.0.1:8080;": f"server {upstream};",
    })
    (workdir / "nginx-msgledger.conf").write_text(site)
    temp = "".join(f"    {kind}_temp_path {workdir / ('nginx-' + kind)};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = workdir / "nginx.conf"
    main.write_text("worker_processes auto;\n"
                    f"error_log {workdir / 'nginx-error.log'} notice;\n"
                    "events { worker_connections 768; }\n"
                    "http {\n"
                    f"    access_log {workdir / 'nginx-access.log'};\n"
                    f"{temp}"
                    f"    include {workdir / 'nginx-msgledger.conf'};\n"
                    "}\n")
    return [_proxy_binary("nginx"), "-p", str(workdir), "-e", str(workdir / "nginx-error.log"),
            "-c", str(main), "-g", f"daemon off; pid {workdir / 'nginx.pid'};"]


def _haproxy_command(workdir: Path, port: int, upstream: str) -> list[str]:
    """deploy/haproxy/msgledger.cfg, substituted, without its chroot/user/group lines
    (they need root and Debian's haproxy account); it logs a line a request to stdout."""
    cert, key = _self_signed(workdir)
    bundle = workdir / "proxy-bundle.pem"
    bundle.write_text(cert.read_text() + key.read_text())
    text = substitute((DEPLOY_DIR / "haproxy" / "msgledger.cfg").read_text(), {
        "bind :443 ": f"bind 127.0.0.1:{port} ",
        "/etc/haproxy/certs/msgledger.pem": str(bundle),
        "server msgledger 127.0.0.1:8080 ": f"server msgledger {upstream} ",
    })
    text = "".join(line for line in text.splitlines(keepends=True)
                   if not line.strip().startswith(("chroot ", "user ", "group ")))
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(text)
    return [_proxy_binary("haproxy"), "-db", "-f", str(cfg)]


def start_proxy(name: str, workdir: Path, upstream: str) -> Proxy:
    """The proxy in the foreground on a free port in front of `upstream`; wait for it."""
    port = free_port()
    command = (_nginx_command if name == "nginx" else _haproxy_command)(workdir, port, upstream)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proxy = Proxy(name, port, proc, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proxy
        except OSError:
            time.sleep(0.05)
    stop_proxy(proxy)
    raise RuntimeError(f"{name} not listening after {READY_TIMEOUT_S:g} s")


def stop_proxy(proxy: Proxy) -> None:
    """SIGTERM to the proxy we started (nginx: fast shutdown; HAProxy: hard stop)."""
    _terminate(proxy.proc)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait for the exit; SIGKILL to its process group after STOP_TIMEOUT_S."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
    """SIGTERM, wait for a graceful exit (SIGKILL after STOP_TIMEOUT_S); the exit code.
    The proxy in front, if any, stops first."""
    if target.proxy is not None:
        stop_proxy(target.proxy)
    _terminate(target.proc)
    return target.proc.returncode


def stored_rows(target: Target) -> int | None:
    """Rows in the target's table after it stopped (None for the empty app)."""
    if target.count_sql is None:
        return None
    found = _counts(target, {"rows": target.count_sql})
    return found["rows"] if found else None


def media_counts(target: Target, window: tuple[str, str]) -> dict[str, int]:
    """What msgledger's media fetcher did, from its store after it stopped: MEDIA_SQL, and
    MEDIA_WINDOW_SQL within `window` (two journal times) prefixed `run_`."""
    found = _counts(target, MEDIA_SQL)
    return found | {f"run_{k}": v for k, v in _counts(target, MEDIA_WINDOW_SQL, window).items()}


def media_still_due(target: Target) -> int:
    """Messages with a media file the fetcher has still to fetch, read while it runs."""
    return _counts(target, {"due": MEDIA_SQL["still_due"]}).get("due", 0)


def _counts(target: Target, queries: dict[str, str],
            args: tuple[str, ...] = ()) -> dict[str, int]:
    """Each query's one number, read-only from the target's store ({} without one)."""
    if target.db_path is None or not target.db_path.exists():
        return {}
    with sqlite3.connect(f"file:{target.db_path}?mode=ro", uri=True) as db:
        return {key: int(db.execute(sql, args).fetchone()[0]) for key, sql in queries.items()}


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


def tree_rss_mb(*roots: int) -> float:
    """VmRSS summed over the processes and their descendants (gunicorn, hypercorn and nginx
    fork)."""
    return sum(_rss_kb(pid) for root in roots for pid in _proc_tree(root)) / 1024


def tree_cpu_s(*roots: int) -> float:
    """User + system CPU of the live process trees, children already reaped included."""
    ticks = 0
    for pid in (pid for root in roots for pid in _proc_tree(root)):
        fields = _stat_fields(pid)
        if fields:
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS

