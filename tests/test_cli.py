"""The offline commands `export`, `verify` and `status` on a real store, run in-process through
`msgledger.cli.main` (and once as the installed console script, for the exit codes)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from msgledger import settings, store
from msgledger.cli import CSV_FIELDS, daemon_api, main
from msgledger.events import Event, utc_now

from .conftest import ACCOUNT_SID, child_env, start_child

MSGLEDGER = Path(sys.executable).with_name("msgledger")
SID_X = "SM" + "1" * 32
SID_Y = "SM" + "2" * 32
SID_Z = "SM" + "3" * 32


def at(day: int, second: int = 0) -> str:
    return f"2024-05-{day:02d}T23:59:{second:02d}.000000+00:00"


def callback(sid: str, status: str, when: str, error_code: str = "") -> Event:
    params = [["MessageSid", sid], ["MessageStatus", status], ["To", "+15005550006"],
              ["From", "+15005550001"], ["ErrorCode", error_code]]
    return Event("callback", "callback", when, sid=sid, status=status, data={"params": params})


EVENTS = [
    # ref-1 -> SID_X: sent through msgledger on 1 May, delivered on 2 May.
    Event("send_requested", "api", at(1, 1), ref="ref-1", status="requested",
          data={"to": "+15005550006", "from": "+15005550001", "body": "hello"}),
    Event("send_accepted", "api", at(1, 2), sid=SID_X, ref="ref-1", status="queued",
          data={"status": "queued"}),
    callback(SID_X, "delivered", at(2, 3)),
    # SID_Y: known from its callbacks only, failed on 2 May.
    callback(SID_Y, "sent", at(2, 4)),
    callback(SID_Y, "failed", at(2, 5), error_code="30008"),
    # SID_Z: imported by the reconciler on 3 May.
    Event("reconciled", "reconcile", at(3, 6), sid=SID_Z, status="delivered",
          data={"to": "+15005550007", "from": "+15005550001", "flags": ["imported"]}),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands read os.environ: keep the machine's own msgledger settings out."""
    for name in list(os.environ):
        if name.startswith(("MSGLEDGER_", "TWILIO_")):
            monkeypatch.delenv(name)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    writer = store.JournalWriter.open(str(path))
    writer.append(EVENTS[:2])
    for event in EVENTS[2:]:
        writer.append([event])
    writer.close()
    return path


@pytest.fixture
def config(tmp_path: Path, db: Path) -> str:
    path = tmp_path / "msgledger.toml"
    path.write_text(f'[store]\npath = "{db}"\n')  # no token: the offline commands need none
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tamper(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER journal_refuses_update")
    conn.execute("DROP TRIGGER journal_refuses_delete")
    conn.execute(sql)
    conn.close()


# --- export


def test_export_jsonl_one_line_per_message(capsys: pytest.CaptureFixture[str],
                                           config: str) -> None:
    """`export` writes one JSON line per message with the record fields and full history."""
    code, out, _ = run(capsys, "export", "--config", config)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["sid"] for r in records] == [SID_X, SID_Y, SID_Z]
    x, y, z = records
    assert {k: x[k] for k in ("sid", "ref", "to", "from", "status", "error_code", "created_at",
                              "updated_at", "flags")} == {
        "sid": SID_X, "ref": "ref-1", "to": "+15005550006", "from": "+15005550001",
        "status": "delivered", "error_code": None, "created_at": at(1, 1),
        "updated_at": at(2, 3), "flags": []}
    assert [(h["seq"], h["at"], h["source"], h["status"]) for h in x["history"]] == [
        (1, at(1, 1), "api", "requested"), (2, at(1, 2), "api", "queued"),
        (3, at(2, 3), "callback", "delivered")]
    assert (y["ref"], y["status"], y["error_code"]) == (None, "failed", "30008")
    assert [h["seq"] for h in y["history"]] == [4, 5]
    assert (z["status"], z["flags"], z["history"][0]["source"]) == ("delivered", ["imported"],
                                                                   "reconcile")


def test_export_csv_with_header(capsys: pytest.CaptureFixture[str], config: str) -> None:
    """`--format csv` writes a header row, then one row per message with flags and history."""
    code, out, _ = run(capsys, "export", "--config", config, "--format", "csv")
    assert code == 0
    assert out.splitlines()[0] == ",".join(CSV_FIELDS)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["sid"], r["status"], r["error_code"], r["flags"]) for r in rows] == [
        (SID_X, "delivered", "", ""), (SID_Y, "failed", "30008", ""),
        (SID_Z, "delivered", "", "imported")]
    assert [h["seq"] for h in json.loads(rows[0]["history"])] == [1, 2, 3]
    assert {"sid", "ref", "to", "from", "created_at", "updated_at"} <= set(CSV_FIELDS)


def test_export_csv_cells_never_run_as_formulas(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A cell that starts with =, +, -, @, a tab or a CR gets a leading quote, so no
    spreadsheet evaluates a body or a number that came from outside."""
    db = tmp_path / "formula.db"
    writer = store.JournalWriter.open(str(db))
    writer.append([Event("send_requested", "api", at(1), ref="=HYPERLINK(1)", status="@x",
                         data={"to": "+15005550006", "from": "-1", "body": "=cmd|' /C calc'!A0"})])
    writer.close()
    config = tmp_path / "formula.toml"
    config.write_text(f'[store]\npath = "{db}"\n')
    code, out, _ = run(capsys, "export", "--config", str(config), "--format", "csv")
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert (row["ref"], row["status"], row["to"], row["from"], row["body"]) == (
        "'=HYPERLINK(1)", "'@x", "'+15005550006", "'-1", "'=cmd|' /C calc'!A0")
    assert row["created_at"] == at(1)  # what starts otherwise is left as it is


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-file"])
def test_export_file_is_private_whatever_the_umask(tmp_path: Path, config: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   existing: bool) -> None:
    """`export -o` leaves a file only its owner can read, even under umask 000 and over a
    file that was world-readable."""
    out = tmp_path / "export.jsonl"
    if existing:
        out.write_text("old")
        out.chmod(0o644)
    old_umask = os.umask(0)
    try:
        code, _, _ = run(capsys, "export", "--config", config, "-o", str(out))
    finally:
        os.umask(old_umask)
    assert code == 0 and out.stat().st_mode & 0o777 == 0o600
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(("args", "sids"), [
    (["--since", "2024-05-02"], [SID_Y, SID_Z]),
    (["--until", "2024-05-02"], [SID_X, SID_Y]),
    (["--since", "2024-05-02", "--until", "2024-05-02"], [SID_Y]),
    (["--since", "2024-05-04"], []),
])
def test_export_since_until_by_creation_day(capsys: pytest.CaptureFixture[str], config: str,
                                            args: list[str], sids: list[str]) -> None:
    """`--since`/`--until` pick messages by the UTC day they were created, both inclusive."""
    code, out, _ = run(capsys, "export", "--config", config, *args)
    assert code == 0
    assert [json.loads(line)["sid"] for line in out.splitlines()] == sids


def test_export_to_file(capsys: pytest.CaptureFixture[str], config: str, tmp_path: Path) -> None:
    """`--output` writes the export to a file and nothing to stdout."""
    target = tmp_path / "export.jsonl"
    code, out, _ = run(capsys, "export", "--config", config, "-o", str(target))
    assert (code, out) == (0, "")
    assert len(target.read_text().splitlines()) == 3


def test_export_while_the_writer_is_open(capsys: pytest.CaptureFixture[str], config: str,
                                         db: Path) -> None:
    """Export reads a store the daemon holds open, and sees everything committed so far."""
    writer = store.JournalWriter.open(str(db))
    try:
        writer.append([callback("SM" + "4" * 32, "queued", at(4))])
        code, out, _ = run(capsys, "export", "--config", config)
    finally:
        writer.close()
    assert code == 0
    assert len(out.splitlines()) == 4


def test_export_refuses_a_bad_date(capsys: pytest.CaptureFixture[str], config: str) -> None:
    """A --since that is not YYYY-MM-DD is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        main(["export", "--config", config, "--since", "yesterday"])
    assert exited.value.code == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


# --- verify and status


def test_verify_good_store(capsys: pytest.CaptureFixture[str], config: str) -> None:
    """`verify` on an untouched store exits 0 and prints one JSON line saying so."""
    code, out, _ = run(capsys, "verify", "--config", config)
    assert code == 0
    assert out.count("\n") == 1
    assert json.loads(out) == {"ok": True, "events": 6, "messages": 3, "first_bad_seq": None,
                               "reason": ""}


def test_verify_tampered_store(capsys: pytest.CaptureFixture[str], config: str,
                               db: Path) -> None:
    """`verify` on an edited journal exits 1 and names the first bad sequence number."""
    tamper(db, "UPDATE journal SET status = 'delivered' WHERE seq = 5")
    code, out, _ = run(capsys, "verify", "--config", config)
    assert code == 1
    report = json.loads(out)
    assert (report["ok"], report["first_bad_seq"]) == (False, 5)
    assert report["reason"]


def test_verify_missing_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`verify` on a store path with nothing there exits 1."""
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "absent.db"}"\n')
    code, out, _ = run(capsys, "verify", "--config", str(config))
    assert code == 1
    assert json.loads(out)["ok"] is False


@pytest.mark.parametrize("command", ["export", "status"])
def test_missing_store_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   command: str) -> None:
    """`export` and `status` on a store that is not there say so in one line and exit 1."""
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "absent.db"}"\n')
    code, out, err = run(capsys, command, "--config", str(config))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "absent.db" in err
    assert not (tmp_path / "absent.db").exists()


def test_status_counts(capsys: pytest.CaptureFixture[str], config: str) -> None:
    """`status` prints JSON with the journal size and the messages counted by status."""
    code, out, _ = run(capsys, "status", "--config", config)
    assert code == 0
    report = json.loads(out)
    assert report["events"] == 6
    assert report["by_status"] == {"delivered": 2, "failed": 1}
    assert report["last_reconcile"] is None  # no run yet


def test_status_reports_the_overdue_backlog(capsys: pytest.CaptureFixture[str], config: str,
                                           db: Path) -> None:
    """`status` counts messages still not final `overdue_after` after they were sent, gives
    the oldest one's age, and has a place for the last reconcile (docs/design.md, "CLI
    commands and exit codes")."""
    writer = store.JournalWriter.open(str(db))
    writer.append([callback("SM" + "4" * 32, "sent", at(4)),  # long overdue
                   callback("SM" + "5" * 32, "queued", utc_now())])  # sent just now
    writer.close()
    _, out, _ = run(capsys, "status", "--config", config)
    report = json.loads(out)
    assert report["overdue"] == 1
    assert report["oldest_overdue_age_seconds"] > 365 * 86400
    assert "last_reconcile" in report


def run_events(run_id: str, day: int, report: dict[str, object]) -> list[Event]:
    """A run's two journal events, as the reconciler writes them (docs/design.md, "The
    daily reconciler")."""
    started = {"run_id": run_id, "date": f"2024-05-{day:02d}", "asked": "list",
               "trigger": "daily"}
    return [Event("reconcile_started", "reconcile", at(day, 10), data=started),
            Event("reconcile_run", "reconcile", at(day, 20), data={**started, **report})]


def test_status_shows_the_last_reconcile_run(capsys: pytest.CaptureFixture[str], config: str,
                                            db: Path) -> None:
    """`status` shows the report of the run that ended last, as the journal holds it; one
    recorded at start-up for a run an earlier process never ended reads as a run that read
    nothing, started when it was asked for."""
    done = {"status": "done", "source": "list", "started_at": at(3, 10),
            "finished_at": at(3, 20), "duration_s": 0.5, "waited_s": 0.1, "reason": None,
            "pages": 1,
            "lines": 0, "last_page": "first", "job_sid": None, "counts": {"listed": 3},
            "broken": [], "complete": True}
    interrupted = {"status": "incomplete", "complete": False, "finished_at": at(4, 20),
                   "reason": "the daemon stopped during the run"}
    writer = store.JournalWriter.open(str(db))
    writer.append(run_events("RN" + "a" * 32, 3, done))
    _, out, _ = run(capsys, "status", "--config", config)
    first = json.loads(out)["last_reconcile"]
    writer.append(run_events("RN" + "b" * 32, 4, interrupted))
    writer.close()
    _, out, _ = run(capsys, "status", "--config", config)
    last = json.loads(out)["last_reconcile"]
    assert first == {"run_id": "RN" + "a" * 32, "date": "2024-05-03", "asked": "list",
                     "trigger": "daily", **done}
    assert last == {"run_id": "RN" + "b" * 32, "date": "2024-05-04", "asked": "list",
                    "trigger": "daily", "status": "incomplete", "source": None,
                    "started_at": at(4, 10), "finished_at": at(4, 20), "duration_s": None,
                    "waited_s": 0.0,
                    "reason": "the daemon stopped during the run", "pages": 0, "lines": 0,
                    "last_page": None, "job_sid": None, "counts": {}, "broken": [],
                    "complete": False}


@pytest.mark.parametrize(("environ", "where"), [
    ({"MSGLEDGER_HTTP_LISTEN": "127.0.0.1:8080"}, "http://127.0.0.1:8080"),
    ({"MSGLEDGER_HTTP_LISTEN": "0.0.0.0:8080", "MSGLEDGER_HTTP_PUBLIC_URL": "https://x.example"},
     "http://127.0.0.1:8080"),
    ({"MSGLEDGER_HTTP_ADMIN_LISTEN": "[::]:8081"}, "http://[::1]:8081"),
    ({"MSGLEDGER_HTTP_ADMIN_LISTEN": "10.0.0.5:8081"}, "http://10.0.0.5:8081"),
    ({"MSGLEDGER_HTTP_ADMIN_LISTEN": "/run/msgledger/admin.sock"},
     "unix:/run/msgledger/admin.sock"),
], ids=["listen", "listen-anywhere", "admin-anywhere", "admin", "admin-socket"])
def test_reconcile_finds_v1_where_the_configuration_serves_it(environ: dict[str, str],
                                                              where: str) -> None:
    """`reconcile` asks `http.admin_listen` when it is set (host:port or a unix socket),
    else `http.listen`; an address that listens everywhere is asked on loopback."""
    loaded = settings.load(environ={"MSGLEDGER_API_TOKEN": "t", **environ},
                           require_secrets=False)
    assert daemon_api(loaded).where == where


@pytest.mark.parametrize(("environ", "key"), [
    ({"MSGLEDGER_API_TOKEN": "t", "MSGLEDGER_HTTP_LISTEN": "127.0.0.1:0"}, "http.listen"),
    ({"MSGLEDGER_API_TOKEN": "t", "MSGLEDGER_HTTP_ADMIN_LISTEN": "127.0.0.1:0"},
     "http.admin_listen"),
    ({}, "api.token"),
])
def test_reconcile_without_a_way_to_the_daemon_exits_2(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        environ: dict[str, str], key: str) -> None:
    """Without a token, or with port 0 where `/v1` is, `reconcile` cannot ask the daemon:
    exit 2, one line naming the key, and no request made."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "reconcile", "--date", "2024-05-01")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and key in err


def test_config_error_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An offline command with a bad configuration exits 2 with one line naming the key."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[store]\npaht = "x.db"\n')
    code, out, err = run(capsys, "verify", "--config", str(bad))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "store.paht" in err


def test_console_script_exit_codes(config: str, db: Path) -> None:
    """The installed `msgledger verify` exits 0 on a good store and 1 once it is tampered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSGLEDGER_", "TWILIO_"))}
    command = [str(MSGLEDGER), "verify", "--config", config]
    good = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)
    tamper(db, "DELETE FROM journal WHERE seq = 2")
    bad = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)
    assert (good.returncode, json.loads(good.stdout)["ok"]) == (0, True)
    assert (bad.returncode, json.loads(bad.stdout)["first_bad_seq"]) == (1, 2)


@pytest.mark.parametrize("command", ["export", "status"])
def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path, command: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """export and status on a file SQLite cannot read say so in one line, exit 1."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(bytes(range(256)) * 32)
    config = tmp_path / "junk.toml"
    config.write_text(f'[store]\npath = "{junk}"\n')
    code, out, err = run(capsys, command, "--config", str(config))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "cannot be read" in err


@pytest.mark.parametrize("credentials", [True, False], ids=["with-twilio", "without"])
async def test_status_asks_the_running_daemon_how_its_poller_is(
        tmp_path: Path, credentials: bool) -> None:
    """Whether the poller runs or is paused lives in the daemon, not the store: `status`
    asks the daemon's /healthz (`running`, or `off` without Twilio credentials), and says
    so when no daemon answers."""
    with socket.socket() as probe:  # a port free now, for a daemon `status` can find
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    extra = {"MSGLEDGER_TWILIO_ACCOUNT_SID": ACCOUNT_SID,
             "MSGLEDGER_TWILIO_API_BASE_URL": "http://127.0.0.1:9"} if credentials else {}
    env = child_env(tmp_path / "s.db", MSGLEDGER_HTTP_LISTEN=f"127.0.0.1:{port}", **extra)
    async with trio.open_nursery() as nursery:
        child = await start_child(nursery, env)
        answered = await trio.run_process([sys.executable, "-m", "msgledger", "status"],
                                          env=env, capture_stdout=True)
        child.process.send_signal(signal.SIGTERM)
        await child.process.wait()
    alone = await trio.run_process([sys.executable, "-m", "msgledger", "status"], env=env,
                                   capture_stdout=True)
    assert json.loads(answered.stdout)["poller"] == ("running" if credentials else "off")
    assert json.loads(alone.stdout)["poller"].startswith(
        f"unknown: no daemon answers at http://127.0.0.1:{port}/healthz")
