"""The store is exactly the configured file, only one daemon's, and noticed when it vanishes:
`store.path` taken as a path, the writer's lock, private files, what is not a store refused
at start (exit 4, one line), the per-batch check that the store's names still lead to the
files written, /healthz following the store (in the main process and in fronts), and
verify checking the file itself. Real SQLite files and real `msgledger run` children."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import trio

from msgledger import cli, store
from msgledger.events import Event
from msgledger.store._schema import SCHEMA_VERSION
from msgledger.workers.link import HealthFrame, LinkBroken, health_from_wire

from .conftest import ChildDaemon, callback_params, child_env, new_sid, signed, start_child

NEWER = SCHEMA_VERSION + 1  # a schema version no msgledger reads yet
SENDERS = 16  # concurrent callers: enough to keep several callbacks in every batch
Change = Callable[[Path], None]


def callback(n: int) -> Event:
    sid = f"SM{n:032x}"
    return Event("callback", "callback", "2024-05-01T10:00:00.000000+00:00", sid=sid,
                 status="sent", data={"params": [["MessageSid", sid], ["To", "+15005550006"]]})


def written_store(path: Path, events: int = 3, batch: int = 1) -> Path:
    writer = store.JournalWriter.open(str(path))
    try:
        for start in range(0, events, batch):
            writer.append([callback(n) for n in range(start, min(start + batch, events))])
    finally:
        writer.close()
    return path


def config_file(tmp_path: Path, store_path: Path) -> str:
    config = tmp_path / "msgledger.toml"
    config.write_text(f"[store]\npath = {json.dumps(str(store_path))}\n")  # a TOML string too
    return str(config)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The offline commands read os.environ: keep the machine's own settings out."""
    for name in list(os.environ):
        if name.startswith(("MSGLEDGER_", "TWILIO_")):
            monkeypatch.delenv(name)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


async def post(client: httpx.AsyncClient, child: ChildDaemon, sid: str, **extra: str) -> int:
    """A signed status callback for `sid`; the answer's status code."""
    params = callback_params(sid, "delivered", **extra)
    response = await client.post(child.url + "/twilio/status", content=urlencode(params),
                                 headers=signed(child.url + "/twilio/status", params))
    return response.status_code


# --- item 4: the file named, and only that


@pytest.mark.parametrize("name", ["x.db?mode=memory", "a#b.db", "a%20b.db", "a b.db"])
def test_store_path_is_exactly_the_file_named(tmp_path: Path, name: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A `?`, `#`, `%20` or space in store.path is part of the file name: the writer writes
    that file (not memory, not another name), and export and verify read the same one."""
    folder = tmp_path / "store"
    folder.mkdir()
    written_store(folder / name)
    assert os.listdir(folder) == [name] and (folder / name).stat().st_size > 0
    config = config_file(tmp_path, folder / name)
    code, out = run_cli(capsys, "verify", "--config", config)
    assert (code, json.loads(out)["events"]) == (0, 3)
    code, out = run_cli(capsys, "export", "--config", config)
    assert code == 0 and len(out.splitlines()) == 3


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("before", ["absent", "empty file"])
def test_store_files_are_private_whatever_the_umask(tmp_path: Path, before: str) -> None:
    """The store and its -wal and -shm are created 0600 even with umask 0 (or from an empty
    file someone made first): they hold numbers, bodies and replayable signatures."""
    path = tmp_path / "ledger.db"
    with umask(0):
        if before == "empty file":
            path.touch(0o666)
        writer = store.JournalWriter.open(str(path))
        try:
            writer.append([callback(1)])
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        finally:
            writer.close()
    assert modes == {"ledger.db": 0o600, "ledger.db-wal": 0o600, "ledger.db-shm": 0o600}


def test_one_writer_at_a_time_and_readers_never_wait(tmp_path: Path) -> None:
    """While a writer holds the store a second is refused, naming it; readers (verify, a
    read-only connection) read all the same and the first writer carries on."""
    path = str(written_store(tmp_path / "ledger.db"))
    first = store.JournalWriter.open(path)
    try:
        with pytest.raises(store.StoreError, match="in use") as refused:
            store.JournalWriter.open(path)
        assert refused.value.path == path and path in str(refused.value)
        assert store.verify(path) == store.VerifyResult(True, 3, 3)
        reader = store.connect(path, readonly=True)
        assert store.journal_size(reader) == 3
        reader.close()
        assert first.append([callback(9)]) == [4]
    finally:
        first.close()
    store.JournalWriter.open(path).close()  # let go with the writer


def unrelated_database(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT)")
    conn.commit()
    conn.close()
    return "not a msgledger store (it holds accounts)"


def newer_store(path: Path) -> str:
    written_store(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(NEWER),))
    conn.commit()
    conn.close()
    return f"schema version {NEWER} is newer"


def random_bytes(path: Path) -> str:
    path.write_bytes(os.urandom(20000))
    return "file is not a database"


def directory(path: Path) -> str:
    path.mkdir()
    return "is a directory"


def empty_file(path: Path) -> str:
    path.touch()
    return "an empty database"


def missing_directory(path: Path) -> str:
    return f"no directory {path.parent}"


def device(path: Path) -> str:
    path.symlink_to("/dev/null")  # SQLite would "write" there and keep nothing
    return "not a regular file"


UNFIT: dict[str, tuple[str, Callable[[Path], str]]] = {
    "unrelated-db": ("ledger.db", unrelated_database),
    "newer-schema": ("ledger.db", newer_store),
    "corrupt": ("ledger.db", random_bytes),
    "directory": ("ledger.db", directory),
    "missing-directory": ("gone/ledger.db", missing_directory),
    "device": ("ledger.db", device),
}


def failed_start(store_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msgledger", "run"], env=child_env(store_path),
                          capture_output=True, text=True, timeout=30)


def assert_one_line(ran: subprocess.CompletedProcess[str], store_path: Path, why: str) -> None:
    """Exit 4 (start failed) and a single `start_failed` line naming the store and why."""
    assert (ran.returncode, ran.stderr) == (4, ""), ran.stderr[-2000:]
    [line] = [json.loads(text) for text in ran.stdout.splitlines()]
    assert line["event"] == "start_failed" and line["store"] == str(store_path)
    assert str(store_path) in line["error"] and why in line["error"], line


@pytest.mark.parametrize("case", list(UNFIT))
def test_run_refuses_what_cannot_be_the_store(tmp_path: Path, case: str) -> None:
    """`msgledger run` on something that cannot be the store (an unrelated database, a newer
    schema, random bytes, a directory, a path in no directory) exits 4 with one line, and
    leaves the file as it found it."""
    name, make = UNFIT[case]
    path = tmp_path / name
    why = make(path)
    before = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    assert_one_line(failed_start(path), path, why)
    assert (path.read_bytes() if path.is_file() and not path.is_symlink() else None) == before
    assert not Path(f"{path}-wal").exists()


def test_a_store_whose_creation_failed_is_created_afresh(tmp_path: Path) -> None:
    """Creating the tables is one transaction: a writer that could not finish it (here: a
    file-size limit hit part-way) leaves an empty database, which the next start takes for
    a new store, not tables without a schema version that it would refuse for ever."""
    db = tmp_path / "ledger.db"
    create = ("import resource, sys; from msgledger import store;"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({CREATE_FSIZE}, {CREATE_FSIZE}));"
              "store.JournalWriter.open(sys.argv[1])")
    ran = subprocess.run([sys.executable, "-c", create, str(db)], capture_output=True,
                         text=True, timeout=30)
    assert ran.returncode == 1 and "StoreError" in ran.stderr, ran.stderr[-2000:]
    assert store.verify(str(written_store(db))) == store.VerifyResult(True, 3, 3)


# bytes: room for the -shm (32 KiB) and the WAL's first frames, not for the whole schema
CREATE_FSIZE = 40 * 1024


def test_run_refuses_an_unwritable_directory(tmp_path: Path) -> None:
    """A directory the daemon cannot create its store in: exit 4, one line. (Tests run as
    root, which every mode bit lets through: the immutable attribute does not.)"""
    folder = tmp_path / "locked"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert_one_line(failed_start(folder / "ledger.db"), folder / "ledger.db",
                        "Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


async def test_a_second_daemon_is_refused_and_readers_still_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second `msgledger run` on a store in use exits 4 with one line naming it; export,
    verify and status read the store meanwhile, and the first daemon keeps serving."""
    db = tmp_path / "ledger.db"
    config = config_file(tmp_path, db)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db))
            async with httpx.AsyncClient(timeout=10) as client:
                assert await post(client, child, new_sid()) == 200
                second = await trio.to_thread.run_sync(failed_start, db)
                assert_one_line(second, db, "in use by another msgledger run")
                for command in ("verify", "export", "status"):
                    assert run_cli(capsys, command, "--config", config)[0] == 0, command
                assert await post(client, child, new_sid()) == 200
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    assert store.verify(str(db)) == store.VerifyResult(True, 2, 2)


# --- item 5: a store that vanishes is noticed


def remove_store(db: Path) -> None:
    for path in db.parent.glob(db.name + "*"):  # rm ledger.db*
        path.unlink()


def replace_store(db: Path) -> None:
    backup = db.with_name("backup.db")
    shutil.copyfile(db, backup)
    os.replace(backup, db)  # a backup renamed over the live file


def remove_wal(db: Path) -> None:
    Path(f"{db}-wal").unlink()


def replace_wal(db: Path) -> None:
    other = db.with_name("other-wal")
    other.write_bytes(b"")
    os.replace(other, f"{db}-wal")


CHANGES: dict[str, tuple[Change, str]] = {
    "store-removed": (remove_store, "removed"), "store-replaced": (replace_store, "replaced"),
    "wal-removed": (remove_wal, "removed"), "wal-replaced": (replace_wal, "replaced"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_writer_refuses_once_its_files_lose_their_names(tmp_path: Path, change: str) -> None:
    """Once the store file or its WAL is removed or replaced, the batch committed into the
    orphan raises StoreLost (first), and so does every later batch, unwritten, until the
    writer is closed."""
    db = tmp_path / "ledger.db"
    make, what = CHANGES[change]
    writer = store.JournalWriter.open(str(db))
    try:
        assert writer.append([callback(1)]) == [1]
        make(db)
        with pytest.raises(store.StoreLost, match=what) as lost:
            writer.append([callback(2)])
        assert lost.value.first and lost.value.path == str(db)
        assert "until msgledger restarts" in lost.value.reason
        with pytest.raises(store.StoreLost) as again:
            writer.append([callback(3)])
        assert not again.value.first and writer.last_seq == 2
        assert writer.refused_batches == 2
    finally:
        writer.close()


def test_what_a_removed_wal_held_is_handed_back_to_the_store(tmp_path: Path) -> None:
    """A writer that finds its WAL's name gone lets the store go at once: SQLite then
    checkpoints that WAL (through the writer's own fd) into the store file, which still has
    its name, so the callbacks acknowledged before the removal survive a later crash."""
    db = tmp_path / "ledger.db"
    writer = store.JournalWriter.open(str(db))
    try:
        writer.append([callback(1)])  # acknowledged: only in the WAL so far
        remove_wal(db)
        with pytest.raises(store.StoreLost):
            writer.append([callback(2)])
        assert store.verify(str(db)) == store.VerifyResult(True, 2, 2)
    finally:
        writer.close()


def test_a_symlinked_store_is_not_taken_for_a_lost_one(tmp_path: Path) -> None:
    """store.path may be a symlink: SQLite keeps the WAL beside the file it leads to, and
    that is the WAL the writer checks."""
    (tmp_path / "data").mkdir()
    link = tmp_path / "ledger.db"
    link.symlink_to(tmp_path / "data" / "ledger.db")
    writer = store.JournalWriter.open(str(link))
    try:
        assert [writer.append([callback(n)]) for n in range(3)] == [[1], [2], [3]]
    finally:
        writer.close()


async def healthz_until(client: httpx.AsyncClient, url: str, status: int) -> dict[str, Any]:
    """/healthz's body once it answers `status` (fronts hear the store's health over their
    link, a moment after the main process). Callers bound the wait."""
    while True:
        response = await client.get(url + "/healthz")
        if response.status_code == status:
            body: dict[str, Any] = response.json()
            return body
        await trio.sleep(0.02)


async def load_with_change(child: ChildDaemon, db: Path, change: Change,
                           ) -> tuple[list[tuple[float, int]], float]:
    """Post unique callbacks from many tasks; once 100 have been acknowledged, make `change`
    to the store; stop 150 answers later. Every answer with when its request started, and
    when the change was done (Trio time)."""
    answers: list[tuple[float, int]] = []
    changed_at: list[float] = []
    done = trio.Event()

    async def sender(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            started = trio.current_time()
            answers.append((started, await post(client, child, new_sid())))
            if not changed_at and sum(code == 200 for _, code in answers) >= 100:
                change(db)
                changed_at.append(trio.current_time())
            if changed_at and sum(t > changed_at[0] for t, _ in answers) >= 150:
                done.set()

    limits = httpx.Limits(max_connections=SENDERS)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client, trio.open_nursery() as n:
        for _ in range(SENDERS):
            n.start_soon(sender, client)
    return answers, changed_at[0]


@pytest.mark.parametrize("change", ["store-removed", "store-replaced"])
async def test_a_store_lost_under_load_is_never_acknowledged(tmp_path: Path, workers: str,
                                                             change: str) -> None:
    """Under a steady stream of callbacks, the store's files removed (`rm ledger.db*`) or a
    backup renamed over it: no request started after that gets 200, /healthz (the main
    process's, or each front's) answers 503 saying why, and one error line says what
    happened however many batches fail after it."""
    db = tmp_path / "ledger.db"
    make, what = CHANGES[change]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db, MSGLEDGER_HTTP_WORKERS=workers))
            answers, changed_at = await load_with_change(child, db, make)
            after = [code for started, code in answers if started > changed_at]
            assert len(after) >= 150 and set(after) == {503}, Counter(after)
            async with httpx.AsyncClient(timeout=10) as client:
                health = await healthz_until(client, child.url, 503)
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    assert sum(code == 200 for started, code in answers if started < changed_at) >= 100
    assert health["status"] == "store_failing" and what in health["reason"]
    assert str(db) in health["reason"]
    events = [line["event"] for line in child.lines]
    assert events.count("store_lost") == 1 and "journal_commit_failed" not in events
    closed = next(line for line in child.lines if line["event"] == "journal_closed")
    assert int(str(closed["refused_batches"])) >= 2


async def test_healthz_follows_commit_failures(tmp_path: Path, workers: str) -> None:
    """While commits fail (the store cannot grow: a file-size limit, as on a full disk)
    /healthz answers 503 with the commit's error; once a commit succeeds again, 200."""
    db = tmp_path / "full.db"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db, MSGLEDGER_HTTP_WORKERS=workers))
            async with httpx.AsyncClient(timeout=10) as client:
                assert await post(client, child, new_sid()) == 200
                assert (await healthz_until(client, child.url, 200))["status"] == "ready"
                limit = max([(await trio.Path(f).stat()).st_size for f in (db, f"{db}-wal")])
                set_file_limit(child.process.pid, limit)
                assert 503 in [await post_big(client, child) for _ in range(30)]
                failing = await healthz_until(client, child.url, 503)
                set_file_limit(child.process.pid, resource.RLIM_INFINITY)
                assert await post(client, child, new_sid()) == 200
                recovered = await healthz_until(client, child.url, 200)
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    logged = {str(line["error"]) for line in child.lines
              if line["event"] == "journal_commit_failed"}
    assert failing["status"] == "store_failing" and failing["reason"] in logged
    assert recovered["status"] == "ready" and "reason" not in recovered


def set_file_limit(pid: int, limit: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


async def post_big(client: httpx.AsyncClient, child: ChildDaemon) -> int:
    """A callback larger than one page: it needs the store to grow."""
    return await post(client, child, new_sid(), Body="x" * 8000)


@pytest.mark.parametrize("frame", [["health"], ["health", 5, "running"], ["health", None],
                                   ["health", None, None], ["health", None, "running", "x"]])
def test_a_malformed_health_frame_breaks_the_link(frame: list[Any]) -> None:
    """A front trusts no frame's shape: a `health` frame that is not [name, reason or null,
    poller state] breaks its link (LinkBroken), as any malformed frame does."""
    assert health_from_wire(["health", None, "off"]) == HealthFrame(None, "off")
    assert health_from_wire(["health", "disk full", "running"]) == HealthFrame("disk full",
                                                                               "running")
    with pytest.raises(LinkBroken, match="health"):
        health_from_wire(frame)


# --- item 6: verify checks the file too


def test_verify_finds_a_damaged_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store of 500 events whose last 4 KiB were overwritten with garbage does not verify
    (exit 1, and why), although its chain and projection still read and check out."""
    db = written_store(tmp_path / "ledger.db", events=500, batch=10)
    with db.open("r+b") as file:
        file.seek(-4096, os.SEEK_END)
        file.write(os.urandom(4096))
    code, out = run_cli(capsys, "verify", "--config", config_file(tmp_path, db))
    report = json.loads(out)
    assert (code, report["ok"]) == (1, False)
    assert report["reason"].startswith(f"{db}: the file is damaged (integrity_check: "), report


@pytest.mark.parametrize(("make", "why"), [
    (newer_store, f"schema version {NEWER} is newer"),
    (unrelated_database, "not a msgledger store"),
    (empty_file, "an empty database, not a msgledger store"),
    (random_bytes, "SQLite cannot read it: file is not a database"),
], ids=["newer-schema", "unrelated-db", "empty-file", "corrupt"])
def test_verify_refuses_what_is_not_a_store_it_reads(tmp_path: Path, make: Callable[[Path], str],
                                                     why: str) -> None:
    """verify on a store of a newer schema, or on a database that is not a msgledger store,
    fails with the reason rather than passing (or raising)."""
    db = tmp_path / "ledger.db"
    make(db)
    result = store.verify(str(db))
    assert not result.ok and why in result.reason and str(db) in result.reason, result
