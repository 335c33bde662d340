"""The SQLite store: the append-only journal, its projection, and the queries on them."""

from ._projection import FINAL, RANK, MessageState, apply, rank
from ._reader import (
    Record,
    find_record,
    iter_records,
    journal_size,
    list_records,
    overdue_backlog,
    overdue_cutoff,
    status_counts,
)
from ._schema import connect
from ._verify import VerifyResult, verify
from ._writer import ChainBroken, JournalWriter

__all__ = ["FINAL", "RANK", "ChainBroken", "JournalWriter", "MessageState", "Record",
           "VerifyResult", "apply", "connect", "find_record", "iter_records", "journal_size",
           "list_records", "overdue_backlog", "overdue_cutoff", "rank", "status_counts", "verify"]
