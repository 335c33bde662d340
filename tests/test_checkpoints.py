"""Checkpoints: the daemon logs the journal's head while it grows and at shutdown, and
`msgledger verify --log` catches a store rewritten or cut behind those lines, which the
chain alone cannot."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import trio

from msgledger import store
from msgledger.cli import main
from msgledger.events import Event

from .conftest import (
    ChildDaemon,
    callback_params,
    child_env,
    new_sid,
    signed,
    start_child,
    wait_until,
)


async def post_callbacks(child: ChildDaemon, count: int) -> None:
    async with httpx.AsyncClient(base_url=child.url) as client:
        for _ in range(count):
            params = callback_params(new_sid(), "delivered")
            response = await client.post("/twilio/status", content=urlencode(params),
                                         headers=signed(child.url + "/twilio/status", params))
            assert response.status_code == 200


def checkpoints(child: ChildDaemon) -> list[dict[str, object]]:
    return [line for line in child.lines if line["event"] == "journal_checkpoint"]


@pytest.fixture
async def logged_store(tmp_path: Path) -> tuple[Path, Path, list[dict[str, object]]]:
    """A store written by a real daemon with a 50 ms checkpoint interval, and its log."""
    db = tmp_path / "ledger.db"
    env = child_env(db, MSGLEDGER_STORE_CHECKPOINT_INTERVAL="50ms")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, env)
            await post_callbacks(child, 20)
            await wait_until(lambda: bool(checkpoints(child)))
            await post_callbacks(child, 20)  # the journal grows past the first checkpoint
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    log = tmp_path / "daemon.log"
    log.write_text("".join(json.dumps(line) + "\n" for line in child.lines))
    return db, log, checkpoints(child)


def verify_log(capsys: pytest.CaptureFixture[str], db: Path, log: Path) -> tuple[int, dict]:
    config = db.with_suffix(".toml")
    config.write_text(f'[store]\npath = "{db}"\n')
    code = main(["verify", "--config", str(config), "--log", str(log)])
    return code, json.loads(capsys.readouterr().out)


def forge(db: Path, keep: int, restatus_first: str | None = None) -> None:
    """Rebuild `db` from its own first `keep` events, optionally with the first event's
    status changed: a store that its chain and projection fully vouch for."""
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT at, kind, source, sid, ref, status, data FROM journal"
                        " ORDER BY seq LIMIT ?", (keep,)).fetchall()
    conn.close()
    events = [Event(kind, source, at, sid=sid, ref=ref, status=status, data=json.loads(data))
              for at, kind, source, sid, ref, status, data in rows]
    if restatus_first is not None:
        first = events[0]
        events[0] = Event(first.kind, first.source, first.at, sid=first.sid, ref=first.ref,
                          status=restatus_first, data=first.data)
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    writer = store.JournalWriter.open(str(db))
    writer.append(events)
    writer.close()


async def test_checkpoints_are_logged_while_growing_and_at_shutdown(
        logged_store: tuple[Path, Path, list[dict[str, object]]]) -> None:
    """Lines come while the journal grows, never twice for one seq from the timer, and the
    last one, logged at shutdown, names the last row and its hash."""
    db, _, lines = logged_store
    seqs = [int(str(line["seq"])) for line in lines]
    assert len(seqs) >= 2 and seqs[-1] == 40
    assert seqs[:-1] == sorted(set(seqs[:-1]))  # the timer logs only when it has grown
    conn = sqlite3.connect(db)
    [(head,)] = conn.execute("SELECT hash FROM journal WHERE seq = 40").fetchall()
    conn.close()
    assert lines[-1]["head"] == head


async def test_verify_log_passes_on_the_true_store(
        logged_store: tuple[Path, Path, list[dict[str, object]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The store the daemon wrote agrees with every checkpoint it logged."""
    db, log, lines = logged_store
    code, report = verify_log(capsys, db, log)
    assert (code, report["ok"], report["checkpoints"]) == (0, True, len(lines))


@pytest.mark.parametrize(("keep", "restatus"), [(30, None), (40, "failed")],
                         ids=["tail-cut", "rewritten"])
async def test_verify_log_catches_what_the_chain_cannot(
        logged_store: tuple[Path, Path, list[dict[str, object]]],
        capsys: pytest.CaptureFixture[str], keep: int, restatus: str | None) -> None:
    """A store cut short, or rewritten with every hash recomputed, passes plain verify but
    fails `verify --log`, which names the first checkpoint it contradicts."""
    db, log, lines = logged_store
    forge(db, keep, restatus)
    assert store.verify(str(db)).ok  # the chain and the projection are fooled
    code, report = verify_log(capsys, db, log)
    first_bad = next(int(str(line["seq"])) for line in lines
                     if restatus is not None or int(str(line["seq"])) > keep)
    assert (code, report["ok"], report["first_bad_seq"]) == (1, False, first_bad)
    assert f"seq {first_bad}" in report["reason"]


def test_checkpoint_lines_are_found_among_any_others() -> None:
    """Other events, lines that are not JSON and malformed checkpoints are skipped."""
    lines = ['-- journal begins --\n', '{"event":"callback_journaled","seq":3}\n',
             '{"event":"journal_checkpoint","seq":"7","head":"x"}\n',
             '{"event":"journal_checkpoint"\n',
             '{"event":"journal_checkpoint","seq":7,"head":"ab","timestamp":"T"}\n']
    assert list(store.read_checkpoints(lines)) == [store.Checkpoint(7, "ab", 5, "T")]


def test_a_log_without_checkpoints_does_not_pass(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An auditor who hands verify the wrong file is told so, not reassured."""
    db = tmp_path / "ledger.db"
    store.JournalWriter.open(str(db)).close()
    log = tmp_path / "empty.log"
    log.write_text('{"event":"daemon_ready"}\n')
    code, report = verify_log(capsys, db, log)
    assert (code, report["checkpoints"]) == (1, 0) and "no journal_checkpoint" in report["reason"]
