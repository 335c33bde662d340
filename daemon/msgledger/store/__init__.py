"""The SQLite store: the append-only journal, its projection, and the queries on them."""

from ._checkpoints import (
    CHECKPOINT_EVENT,
    Checkpoint,
    CheckpointResult,
    check_checkpoints,
    read_checkpoints,
)
from ._file import StoreError, StoreLost
from ._fold import FINAL, RANK, MessageState, apply, rank
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
from ._writer import ChainBroken, JournalWriter, Tail

__all__ = ["CHECKPOINT_EVENT", "FINAL", "RANK", "ChainBroken", "Checkpoint", "CheckpointResult",
           "JournalWriter", "MessageState", "Record", "StoreError", "StoreLost", "Tail",
           "VerifyResult", "apply", "check_checkpoints", "connect", "find_record",
           "iter_records", "journal_size", "list_records", "overdue_backlog", "overdue_cutoff",
           "rank", "read_checkpoints", "status_counts", "verify"]
