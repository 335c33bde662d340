"""The SQLite store: the append-only journal, its projection, and the queries on them."""

from . import _fold_media as media_states
from ._checkpoints import (
    CHECKPOINT_EVENT,
    Checkpoint,
    CheckpointResult,
    check_checkpoints,
    read_checkpoints,
)
from ._file import StoreError, StoreLost
from ._fold import FINAL, RANK, MessageState, apply, rank
from ._fold_media import MediaItem
from ._media_work import MediaWork, due_media, media_file
from ._reader import (
    Record,
    find_record,
    iter_records,
    journal_size,
    list_records,
    overdue_cutoff,
    status_counts,
)
from ._schedule import NO_CURSOR, Cursor, DueMessage, first_polls, poll_backlog, repolls
from ._schema import connect, store_version
from ._verify import VerifyResult, verify
from ._writer import ChainBroken, JournalWriter, Tail

__all__ = ["CHECKPOINT_EVENT", "FINAL", "NO_CURSOR", "RANK", "ChainBroken", "Checkpoint",
           "CheckpointResult", "Cursor", "DueMessage", "JournalWriter", "MediaItem", "MediaWork",
           "MessageState", "Record", "StoreError", "StoreLost", "Tail", "VerifyResult", "apply",
           "check_checkpoints", "connect", "due_media", "find_record", "first_polls",
           "iter_records", "journal_size", "list_records", "media_file", "media_states",
           "overdue_cutoff", "poll_backlog", "rank", "read_checkpoints", "repolls",
           "status_counts", "store_version", "verify"]
