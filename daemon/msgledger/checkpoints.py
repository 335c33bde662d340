"""Checkpoints: the journal's head, written where the store cannot reach it.

The hash chain proves the order of what the store holds, not that nothing was cut off or
rewritten: whoever can write the file can drop its tail, or change a row and recompute
every hash after it. So while the journal grows, the daemon logs a `journal_checkpoint`
line (`seq`, and `head`: that row's hash) every `store.checkpoint_interval`, and once more
at shutdown. The lines go to stdout, so to journald or syslog, and from there off the box;
`msgledger verify --log FILE` then checks a store against them (`store.check_checkpoints`).
A head hash commits to every row up to it, so one surviving line pins the whole prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .logs import get_logger
from .store import CHECKPOINT_EVENT, Tail

log = get_logger("msgledger.checkpoints")


async def run_checkpoints(tail: Callable[[], Tail], interval: float) -> None:
    """Log the journal's committed tail every `interval` seconds when it has grown since the
    last line, until cancelled. `tail` reads it (the writer replaces it whole on commit)."""
    logged = tail().seq  # a restart logs again only once something new is committed
    while True:
        await trio.sleep(interval)
        logged = log_checkpoint(tail(), logged)


def log_checkpoint(tail: Tail, logged: int = -1) -> int:
    """Log `tail` unless `logged` already covers it (or the journal is empty); the seq now
    covered. The default logs any non-empty journal: the line written at shutdown."""
    if tail.seq > max(logged, 0):
        log.info(CHECKPOINT_EVENT, seq=tail.seq, head=tail.hash)
    return max(tail.seq, logged)
