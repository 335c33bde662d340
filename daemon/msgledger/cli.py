"""The `msgledger` command: run, export, verify, status, reconcile, sim.

Configuration errors end the command with exit code 2 and one line naming the key.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import http.client
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import quote

import trio

from . import logs, run_reports, store
from . import settings as config

if TYPE_CHECKING:
    from .sim import SimKnobs

EXIT_STORE = 1
EXIT_NOT_DONE = 1  # reconcile: the run did not end done, or was not started
EXIT_CONFIG = 2
EXIT_BROKEN_CHAIN = 3
EXIT_START_FAILED = 4
CSV_FIELDS = ("sid", "ref", "to", "from", "messaging_service_sid", "status", "error_code",
              "final", "flags", "created_at", "updated_at", "sent_at", "body_sha256", "body",
              "direction", "in_reply_to", "received_at", "media", "history")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.command(args))
    except config.ConfigError as e:
        print(f"msgledger: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except sqlite3.DatabaseError as e:  # export, status: a file SQLite cannot read
        print(f"msgledger: the store cannot be read: {e}", file=sys.stderr)
        return EXIT_STORE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msgledger", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--dev", action="store_true",
                     help="local trial: a Twilio simulator, loopback only, throwaway tokens")
    run.set_defaults(command=cmd_run)
    simulator = commands.add_parser("sim", help="run the Twilio simulator alone")
    simulator.add_argument("--listen", default="127.0.0.1:8081", type=config.parse_listen)
    simulator.add_argument("--account-sid", default="AC" + "0" * 32)
    simulator.add_argument("--auth-token", required=True,
                           help="its Basic auth password and callback signing key")
    simulator.add_argument("--step-delay", type=float, nargs=2, default=(0.5, 3.0),
                           metavar=("MIN", "MAX"), help="seconds between a message's statuses")
    simulator.add_argument("--inbound-url",
                           help="the webhook received texts are posted to (POST /sim/inbound)")
    simulator.add_argument("--inbound-fallback-url",
                           help="where they are posted when the webhook fails")
    simulator.set_defaults(command=cmd_sim)
    export = commands.add_parser("export", help="write the whole record (safe while running)")
    export.add_argument("--since", type=_date, help="first UTC day (YYYY-MM-DD), inclusive")
    export.add_argument("--until", type=_date, help="last UTC day (YYYY-MM-DD), inclusive")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", "-o", help="file to write (default: stdout)")
    export.set_defaults(command=cmd_export)
    verify = commands.add_parser("verify", help="check the file, the hash chain and the"
                                 " projection (and the checkpoints logged, with --log)")
    verify.add_argument("--log", metavar="FILE",
                        help="the daemon's JSON log lines: check every journal_checkpoint"
                             " in it against the store")
    verify.set_defaults(command=cmd_verify)
    status = commands.add_parser("status", help="counts by status and journal size")
    status.set_defaults(command=cmd_status)
    reconcile = commands.add_parser("reconcile", help="ask the running daemon to reconcile a"
                                    " UTC day with Twilio")
    reconcile.add_argument("--date", type=_date, required=True,
                           help="the UTC day (YYYY-MM-DD); today reconciles the day so far")
    reconcile.add_argument("--source", choices=("auto", "list", "export"),
                           help="list, export or auto (default: auto)")
    reconcile.add_argument("--wait", action="store_true",
                           help="follow the run until it ends and print its report")
    reconcile.set_defaults(command=cmd_reconcile)
    # Internal: a front process, started by `run` when http.workers > 1 (not for people).
    front = commands.add_parser("front")
    for name in ("--worker", "--link-fd", "--listen-fd", "--parent"):
        front.add_argument(name, type=int, required=True)
    front.set_defaults(command=cmd_front)
    for command in (run, export, verify, status, reconcile):  # `sim` reads no configuration
        command.add_argument("--config", "-c", help="TOML configuration file")
    return parser


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from . import dev, main  # the daemon stack: imported only by the commands that run it

    settings = config.load(args.config, overrides=dev.dev_overrides() if args.dev else None)
    if args.dev:
        settings = dev.throwaway_credentials(settings)
    logs.configure(settings.log_level)
    log = logs.get_logger("msgledger.cli")
    try:
        trio.run(dev.run_dev if args.dev else main.run, settings)
    except store.ChainBroken as broken:
        log.error("journal_chain_broken", seq=broken.seq, why=broken.why)
        return EXIT_BROKEN_CHAIN
    except (OSError, store.StoreError, ExceptionGroup) as error:  # cannot bind, no store...
        failed, rest = (error.split((OSError, store.StoreError))
                        if isinstance(error, ExceptionGroup) else (error, None))
        if failed is None or rest is not None:
            raise  # not (only) a start-up failure: a bug, and its traceback belongs in the log
        log.error("start_failed", error=_describe(failed), listen=settings.http_listen_host,
                  port=settings.http_listen_port, store=settings.store_path)
        return EXIT_START_FAILED
    return 0


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in error.exceptions)
    return str(error)


def cmd_front(args: argparse.Namespace) -> int:
    from .workers import front

    front.die_with_parent(args.parent)
    # Until its signal watcher runs, a signal must not kill it mid-start: the main process
    # asks it to drain over the link as well, and that covers the window.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return trio.run(front.run_front, args.link_fd, args.listen_fd, args.worker)


def cmd_sim(args: argparse.Namespace) -> int:
    from . import sim

    logs.configure("info")
    host, port = args.listen
    try:
        knobs = sim.SimKnobs(args.account_sid, args.auth_token,
                             step_delay=tuple(args.step_delay), inbound_url=args.inbound_url,
                             inbound_fallback_url=args.inbound_fallback_url)
    except ValueError as e:
        print(f"msgledger sim: {e}", file=sys.stderr)
        return EXIT_CONFIG
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(partial(_serve_sim_until_stopped, knobs, host, port))
    return 0


async def _serve_sim_until_stopped(knobs: SimKnobs, host: str, port: int) -> None:
    from .sim import serve_sim

    async with trio.open_nursery() as nursery:
        simulator = await nursery.start(partial(serve_sim, knobs, host=host, port=port))
        logs.get_logger("msgledger.sim").info("sim_ready", base_url=simulator.base_url,
                                              account_sid=knobs.account_sid,
                                              inbound_url=knobs.inbound_url,
                                              inbound_control=simulator.base_url + "/sim/inbound")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()


def _store_exists(path: str) -> bool:
    """Whether the store is there, and of the schema this version reads; if not, say so in
    one line rather than a traceback."""
    if not Path(path).is_file():
        print(f"msgledger: no store at {path} (see store.path)", file=sys.stderr)
        return False
    conn = store.connect(path, readonly=True)
    try:
        store.store_version(conn, path)
    except store.StoreError as error:
        print(f"msgledger: {error}", file=sys.stderr)
        return False
    finally:
        conn.close()
    return True


def cmd_export(args: argparse.Namespace) -> int:
    settings = config.load(args.config, require_secrets=False)
    if not _store_exists(settings.store_path):
        return EXIT_STORE
    since = args.since.isoformat() if args.since else None
    until = (args.until + dt.timedelta(days=1)).isoformat() if args.until else None
    with contextlib.ExitStack() as stack:
        out: TextIO = (stack.enter_context(_private_file(args.output))
                       if args.output else sys.stdout)
        conn = store.connect(settings.store_path, readonly=True)
        stack.callback(conn.close)
        conn.execute("BEGIN")  # one snapshot for the whole export, however long it takes
        records = store.iter_records(conn, since, until)
        (_write_csv if args.format == "csv" else _write_jsonl)(records, out)
        conn.execute("COMMIT")
    return 0


def _private_file(path: str) -> TextIO:
    """`path` for writing, readable by its owner only whatever the umask: an export holds
    phone numbers, bodies and replayable signatures."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was already there keeps its mode otherwise
    return open(fd, "w", newline="", encoding="utf-8")


def _write_jsonl(records: Iterable[store.Record], out: TextIO) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def _write_csv(records: Iterable[store.Record], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        row = dict(record, flags=";".join(record["flags"]),
                   media=json.dumps(record["media"], ensure_ascii=False),
                   history=json.dumps(record["history"], ensure_ascii=False))
        writer.writerow({k: _inert(v) for k, v in row.items()})


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV
# injection"); a body or a number from outside could start with any of them.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: object) -> object:
    """`value` as a cell no spreadsheet evaluates: a leading quote, as OWASP advises.
    (A phone number then reads '+1555..., which is how such tools show it too.)"""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def cmd_verify(args: argparse.Namespace) -> int:
    settings = config.load(args.config, require_secrets=False)
    result = store.verify(settings.store_path)
    report: dict[str, object] = {
        "ok": result.ok, "events": result.events, "messages": result.messages,
        "first_bad_seq": result.first_bad_seq, "reason": result.reason}
    if result.ok and args.log is not None:
        report.update(_check_log(settings.store_path, args.log))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def _check_log(store_path: str, log_path: str) -> dict[str, object]:
    """verify's report fields for the checkpoints in `log_path` (read as a stream: a log
    may be large), checked against one snapshot of the store."""
    try:
        log_file = open(log_path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        return {"ok": False, "checkpoints": 0, "reason": f"{log_path}: {e.strerror}"}
    conn = store.connect(store_path, readonly=True)
    with log_file, contextlib.closing(conn):
        conn.execute("BEGIN")
        checked = store.check_checkpoints(conn, store.read_checkpoints(log_file))
    bad = checked.contradicted
    return {"ok": checked.reason == "", "checkpoints": checked.checked,
            "first_bad_seq": bad.seq if bad else None, "reason": checked.reason}


def cmd_status(args: argparse.Namespace) -> int:
    settings = config.load(args.config, require_secrets=False)
    if not _store_exists(settings.store_path):
        return EXIT_STORE
    now = dt.datetime.now(dt.UTC)
    cutoff = store.overdue_cutoff(settings.poller_overdue_after, now)
    conn = store.connect(settings.store_path, readonly=True)
    try:
        conn.execute("BEGIN")
        overdue, oldest = store.poll_backlog(conn, cutoff)
        report = {
            "events": store.journal_size(conn),
            "by_status": store.status_counts(conn),
            "overdue": overdue,
            "oldest_overdue_age_seconds": _age(now, oldest),
            "last_reconcile": next(iter(run_reports.finished_runs(conn, 1)), None),
        }
        conn.execute("COMMIT")
    finally:
        conn.close()
    report["poller"] = _poller_state(settings)
    print(json.dumps(report, indent=2))
    return 0


HEALTH_TIMEOUT = 2.0  # seconds: a daemon that takes longer to answer /healthz is unwell


def _poller_state(settings: config.Settings) -> str:
    """The running daemon's word on its poller (its /healthz), or why it cannot be had:
    whether the poller is paused lives in the daemon, not in the store."""
    if settings.http_listen_port == 0:
        return "unknown: http.listen has port 0, so the daemon's port is not known"
    host = settings.http_listen_host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.http_listen_port}/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with direct.open(url, timeout=HEALTH_TIMEOUT) as answer:
            body = answer.read()
    except urllib.error.HTTPError as refusal:  # a 503 still says how the poller is
        body = refusal.read()
    except (OSError, ValueError) as error:
        return f"unknown: no daemon answers at {url} ({error})"
    try:
        return str(json.loads(body)["poller"])
    except (ValueError, KeyError, TypeError):
        return f"unknown: {url} does not answer as msgledger does"


API_TIMEOUT = 10.0  # seconds for the daemon to answer one /v1 request
WAIT_EVERY = 1.0  # seconds between two looks at a run followed with --wait
ENDED = ("done", "incomplete", "failed")  # a run's statuses once it has ended
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


class NoAnswer(Exception):
    """The daemon's /v1 cannot be reached, or does not answer as msgledger does."""


@dataclass(frozen=True)
class DaemonApi:
    """The running daemon's `/v1`, where this configuration says it is: `http.admin_listen`
    when set (host:port or a unix socket), else `http.listen`."""

    where: str  # http://host:port or unix:/path, for messages
    token: str
    connect: Callable[[], http.client.HTTPConnection]

    def ask(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """The HTTP status and JSON body of one request; NoAnswer if there is none."""
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        connection = self.connect()
        try:
            connection.request(method, path, None if body is None else json.dumps(body),
                               headers)
            answer = connection.getresponse()
            status, raw = answer.status, answer.read()
        except (OSError, http.client.HTTPException) as error:
            raise NoAnswer(f"no daemon answers at {self.where} ({error})") from None
        finally:
            connection.close()
        try:
            return status, json.loads(raw)
        except ValueError:
            raise NoAnswer(f"{self.where} does not answer as msgledger does (HTTP {status},"
                           " not JSON)") from None


class UnixConnection(http.client.HTTPConnection):
    """HTTP over the unix socket at `path`."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def daemon_api(settings: config.Settings) -> DaemonApi:
    """Where the daemon this configuration runs serves `/v1`, and its token; ConfigError
    when the configuration cannot tell (no token, port 0)."""
    if settings.api_token is None:
        raise config.ConfigError("api.token: not configured, and the daemon refuses /v1"
                                 " without it")
    admin = settings.http_admin_listen
    if admin is not None and admin.startswith("/"):
        return DaemonApi(f"unix:{admin}", settings.api_token,
                         partial(UnixConnection, admin, API_TIMEOUT))
    if admin is not None:
        key, (host, port) = "http.admin_listen", config.parse_listen(admin)
    else:
        key, host, port = "http.listen", settings.http_listen_host, settings.http_listen_port
    if port == 0:
        raise config.ConfigError(f"{key}: port 0, so the daemon's port is not known; give"
                                 " it a fixed port")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # any: us
    where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return DaemonApi(where, settings.api_token,
                     partial(http.client.HTTPConnection, host, port, timeout=API_TIMEOUT))


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Ask the daemon for a run of `--date`; with `--wait`, follow it until it ends."""
    api = daemon_api(config.load(args.config, require_secrets=False))
    body = {"date": args.date.isoformat()}
    if args.source is not None:
        body["source"] = args.source
    try:
        status, answer = api.ask("POST", "/v1/reconcile", body)
        if status != 202:
            return _refused(status, answer)
        print(json.dumps(answer), flush=True)
        return _follow(api, str(answer["run_id"])) if args.wait else 0
    except NoAnswer as error:
        print(f"msgledger: {error}", file=sys.stderr)
        return EXIT_NOT_DONE
    except KeyboardInterrupt:
        print("msgledger: interrupted; a run already asked for goes on in the daemon",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _follow(api: DaemonApi, run_id: str) -> int:
    """Look at the run every WAIT_EVERY until it has ended; print its report."""
    while True:
        status, report = api.ask("GET", f"/v1/reconcile/runs/{quote(run_id, safe='')}")
        if status != 200:
            return _refused(status, report)
        if report["status"] in ENDED:
            print(json.dumps(report))
            return 0 if report["status"] == "done" else EXIT_NOT_DONE
        time.sleep(WAIT_EVERY)


def _refused(status: int, answer: Any) -> int:
    """Say why the daemon refused, in one line. A 400 (an argument it judged, such as a day
    in the future) or 401 (api.token is not the daemon's) is the caller's to correct."""
    why = answer.get("error") if isinstance(answer, dict) else None
    print(f"msgledger: the daemon refused (HTTP {status}): {why}", file=sys.stderr)
    return EXIT_CONFIG if status in (400, 401) else EXIT_NOT_DONE


def _age(now: dt.datetime, at: str | None) -> float | None:
    return None if at is None else round((now - dt.datetime.fromisoformat(at)).total_seconds(), 3)


if __name__ == "__main__":
    sys.exit(main())
