"""Multi-row INSERTs: every row lands, in order, whatever the count and width."""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from msgledger.store._bulk import MAX_VARIABLES, insert_rows


@settings(max_examples=60, deadline=None)
@given(count=st.integers(min_value=0, max_value=700), width=st.integers(min_value=1, max_value=40))
def test_every_row_lands_in_order(count: int, width: int) -> None:
    """Chunked statements insert exactly the given rows, in order, under SQLite's oldest
    variable limit."""
    conn = sqlite3.connect(":memory:")
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_VARIABLES)  # as old builds have
    columns = [f"c{i}" for i in range(width)]
    conn.execute(f"CREATE TABLE t (n INTEGER PRIMARY KEY, {', '.join(columns)})")
    rows = [(n, *(f"{n}.{i}" for i in range(width))) for n in range(count)]
    traced: list[str] = []
    conn.set_trace_callback(traced.append)
    insert_rows(conn, f"INSERT INTO t (n, {', '.join(columns)})", rows)
    conn.set_trace_callback(None)
    assert conn.execute("SELECT * FROM t ORDER BY rowid").fetchall() == rows
    # A handful of statements, not one per row: full chunks plus one per power of two.
    most = 1 << ((MAX_VARIABLES // (width + 1)).bit_length() - 1)
    inserts = [sql for sql in traced if sql.startswith("INSERT")]
    assert len(inserts) <= count // most + most.bit_length()


def test_tail_makes_an_upsert() -> None:
    """The tail clause applies to every chunk: here an upsert replaces existing rows."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    insert_rows(conn, "INSERT INTO t (id, v)", [(1, "a"), (2, "b")])
    insert_rows(conn, "INSERT INTO t (id, v)", [(2, "B"), (3, "c")],
                " ON CONFLICT (id) DO UPDATE SET v = excluded.v")
    assert conn.execute("SELECT id, v FROM t ORDER BY id").fetchall() == [
        (1, "a"), (2, "B"), (3, "c")]
