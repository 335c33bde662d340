"""`msgledger verify --log FILE`: check a store against the `journal_checkpoint` lines the
daemon logged (see `msgledger.checkpoints`), which were kept off the box.

A checkpoint says "row `seq` had hash `head`". The store contradicts it when that row's
hash differs (the row or one before it was rewritten, hashes recomputed) or when the row is
gone (the tail was cut). Lines that are not checkpoints, or not JSON at all (journalctl
may add its own), are skipped: the file is whatever the log shipper kept.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CHECKPOINT_EVENT = "journal_checkpoint"  # a log-line contract: `verify --log` reads it


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head: str
    line: int  # where it stands in the log file, 1-based
    at: str  # its timestamp, as logged


@dataclass(frozen=True)
class CheckpointResult:
    checked: int
    contradicted: Checkpoint | None = None
    reason: str = ""


def read_checkpoints(lines: Iterable[str]) -> Iterator[Checkpoint]:
    """The checkpoints in a log, in the order they were logged."""
    for number, text in enumerate(lines, start=1):
        if CHECKPOINT_EVENT not in text:
            continue  # cheap skip: a day of callbacks is millions of other lines
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if not isinstance(line, dict) or line.get("event") != CHECKPOINT_EVENT:
            continue
        seq, head = line.get("seq"), line.get("head")
        if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(head, str):
            yield Checkpoint(seq, head, number, str(line.get("timestamp", "")))


def check_checkpoints(conn: sqlite3.Connection,
                      checkpoints: Iterable[Checkpoint]) -> CheckpointResult:
    """The first checkpoint the store contradicts, if any. `conn` holds one snapshot."""
    checked = 0
    for checkpoint in checkpoints:
        checked += 1
        row = conn.execute("SELECT hash FROM journal WHERE seq = ?",
                           (checkpoint.seq,)).fetchone()
        if row is None:
            return CheckpointResult(checked, checkpoint, _why(checkpoint, "the store has no"
                                                              " such row: its tail was cut"))
        if row[0] != checkpoint.head:
            return CheckpointResult(checked, checkpoint, _why(
                checkpoint, "the store's row has another hash: the journal was rewritten"))
    if checked == 0:
        return CheckpointResult(0, None, "the log holds no journal_checkpoint line")
    return CheckpointResult(checked)


def _why(checkpoint: Checkpoint, what: str) -> str:
    return (f"checkpoint of seq {checkpoint.seq} (log line {checkpoint.line},"
            f" {checkpoint.at or 'no timestamp'}) contradicted: {what}")
