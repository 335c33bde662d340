"""Multi-row INSERTs: one SQLite step for many rows.

`executemany` steps once per row, and the sqlite3 module lets go of the GIL around every
step. The journal writes from a worker thread while the event loop's thread is busy, so
each time the writer wants the GIL back it waits for the loop to yield it (up to the
interpreter's 5 ms switch interval): a batch of N rows paid up to N such waits and held
every producer's reply that long. One statement for a chunk of rows makes it a handful.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence

MAX_VARIABLES = 999  # SQLite's limit before 3.32 (newer builds allow 32,766)


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]],
                tail: str = "") -> None:
    """Run `head VALUES (...), (...) tail` over `rows`, in as few statements as fit.

    Chunks have power-of-two sizes, so a handful of statement texts serve every batch size
    and stay in the connection's statement cache.
    """
    if not rows:
        return
    width = len(rows[0])
    most = _floor_pow2(MAX_VARIABLES // width)
    start = 0
    while start < len(rows):
        count = min(_floor_pow2(len(rows) - start), most)
        chunk = rows[start:start + count]
        conn.execute(_statement(head, width, count, tail), [v for row in chunk for v in row])
        start += count


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@functools.lru_cache(maxsize=128)
def _statement(head: str, width: int, count: int, tail: str) -> str:
    one = f"({', '.join('?' * width)})"
    return f"{head} VALUES {', '.join([one] * count)}{tail}"
