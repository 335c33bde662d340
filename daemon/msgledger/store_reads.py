"""Read-only store queries from the event loop: each in a worker thread on a connection of
its own, so a read never blocks the loop nor the journal writer (WAL lets readers run while
it commits). The HTTP API and the poller read through one of these each.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from . import store

T = TypeVar("T")
READERS = 4  # concurrent reads per owner: WAL readers never wait for each other


class StoreUnreadable(Exception):
    """The store cannot be read (its file removed, an I/O error): the caller's request
    fails (503), the daemon does not."""


# How a blocking call leaves the event loop: `trio.to_thread.run_sync(fn, limiter=...)`. A
# test on virtual time runs it in place instead, so that the clock cannot jump while it waits.
RunSync = Callable[..., Awaitable[Any]]


class StoreReads:
    """Runs read-only queries (`query(conn, *args)`) on the store at `path`."""

    def __init__(self, path: str, *, run_sync: RunSync = trio.to_thread.run_sync) -> None:
        self._path = path
        self._limiter = trio.CapacityLimiter(READERS)
        self._run_sync = run_sync

    async def run(self, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def read() -> T:
            conn = store.connect(self._path, readonly=True)
            try:
                return query(conn, *args, **kwargs)
            finally:
                conn.close()

        try:
            found: T = await self._run_sync(read, limiter=self._limiter)
        except sqlite3.DatabaseError as error:  # the file (gone, damaged), not the query
            raise StoreUnreadable(str(error)) from error
        return found

    async def record(self, key: str) -> store.Record | None:
        return await self.run(store.find_record, key)
