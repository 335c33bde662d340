"""The projection tables: which message an event belongs to, and its folded state.

`Projector` is the only code that writes `messages` and `message_events`. The journal
writer uses it inside the commit that appends the events; `verify` uses it to replay the
journal into a fresh database, so both see exactly the same rules and assign the same ids.

It folds a whole batch in memory (one lookup per message, however many of its events the
batch holds) and writes the batch's changes with a few multi-row statements at the end.
States live only for their batch: a longer-lived cache was tried and measured worse, since
thousands of long-lived objects make the cyclic GC's full collections both more frequent
and longer, and those pauses stall the event loop (bench/README.md, "Measured once").
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from ..events import Event
from ._bulk import insert_rows
from ._fold import MessageState, apply, poll_from
from ._fold_media import media_due, media_from_json
from ._schema import MESSAGE_COLUMNS, JournalRow, journal_columns

_SELECT = f"SELECT id, {', '.join(MESSAGE_COLUMNS)} FROM messages"
_INSERT_INTO = f"INSERT INTO messages (id, {', '.join(MESSAGE_COLUMNS)})"
# Existing rows are rewritten as an upsert: many rows in one statement, unlike UPDATE.
_UPDATE_EXISTING = (" ON CONFLICT (id) DO UPDATE SET "
                    + ", ".join(f"{c} = excluded.{c}" for c in MESSAGE_COLUMNS))
_LOOKUP_CHUNK = 256  # identifiers per IN (...): a power of two under SQLite's oldest limit (999)


def event_from_row(row: JournalRow) -> Event:
    """A journal row back into its Event."""
    return Event(kind=row.kind, source=row.source, at=row.at,  # type: ignore[arg-type]
                 sid=row.sid, ref=row.ref, status=row.status, data=json.loads(str(row.data)))


def fold(events: Iterable[Event]) -> MessageState | None:
    state: MessageState | None = None
    for event in events:
        state = apply(state, event)
    return state


@dataclass
class _Pending:
    state: MessageState
    last_seq: int
    new: bool  # not in the table yet: a plain INSERT, which fails loudly on a taken id


class Projector:
    """Folds events into `messages`, buffering writes until `flush()`.

    Call `apply` for each event in journal order, then `flush` before COMMIT; after a
    ROLLBACK call `reset`, since the batch's states were never committed.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.reset()

    def reset(self) -> None:
        self._states: dict[int, MessageState] = {}
        self._by_sid: dict[str, int] = {}
        self._by_ref: dict[str, int] = {}
        self._pending: dict[int, _Pending] = {}
        self._links: list[tuple[int, int]] = []
        self._absent: dict[str, set[str]] = {"sid": set(), "ref": set()}
        # The high-water mark, not max(id): a merge may have deleted the newest message.
        row = self._conn.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)"
        ).fetchone()
        self._next_id = int(row[0]) + 1

    def prefetch(self, events: Sequence[Event]) -> None:
        """Load every message the batch's events name in a few queries, not one per event.

        Also remembers which identifiers the table does not hold, so `apply` needs no query
        for a message it will create. Valid until the next `flush`.
        """
        for column in ("sid", "ref"):
            index = self._by_sid if column == "sid" else self._by_ref
            wanted = {v for e in events if (v := getattr(e, column)) is not None
                      and v not in index}
            found: set[str] = set()
            for chunk in _chunks(sorted(wanted), _LOOKUP_CHUNK):
                for row in self._conn.execute(_lookup(column, len(chunk)), chunk):
                    found.add(str(row[1 if column == "sid" else 2]))
                    if int(row[0]) not in self._states:
                        self._remember(int(row[0]), _state_from_row(row[1:]))
            self._absent[column] |= wanted - found

    def apply(self, event: Event, seq: int) -> int | None:
        """Fold `event` (journal sequence `seq`) into its message; returns the message id.

        Events that name no message (a Debugger alert about something else) stay
        journal-only.
        """
        if event.sid is None and event.ref is None:
            return None
        message_id, event, extra = self._resolve(event)
        state = apply(None if message_id is None else self._states[message_id], event)
        if extra:
            state = replace(state, flags=state.flags | extra)
        new = message_id is None
        if message_id is None:
            message_id, self._next_id = self._next_id, self._next_id + 1
        self._remember(message_id, state)
        pending = self._pending.get(message_id)
        self._pending[message_id] = _Pending(state, seq, new or bool(pending and pending.new))
        self._links.append((seq, message_id))
        return message_id

    def flush(self) -> None:
        """Write every buffered change: a handful of statements whatever the batch size."""
        rows = {new: [(i, *_values(p.state, p.last_seq)) for i, p in self._pending.items()
                      if p.new == new] for new in (True, False)}
        insert_rows(self._conn, _INSERT_INTO, rows[True])
        insert_rows(self._conn, _INSERT_INTO, rows[False], _UPDATE_EXISTING)
        insert_rows(self._conn, "INSERT INTO message_events (seq, message_id)", self._links)
        self._pending.clear()
        self._links.clear()
        for absent in self._absent.values():  # the rows just written may hold them now
            absent.clear()
        self._states.clear()
        self._by_sid.clear()
        self._by_ref.clear()

    # --- which message an event belongs to

    def _resolve(self, event: Event) -> tuple[int | None, Event, frozenset[str]]:
        by_ref = self._find("ref", event.ref)
        by_sid = self._find("sid", event.sid)
        if by_ref is not None and event.sid is not None:
            known_sid = self._states[by_ref].sid
            if known_sid is not None and known_sid != event.sid:
                # The ref already names another SID: keep this one apart, and say so.
                return by_sid, replace(event, ref=None), frozenset({"ref_conflict"})
        if by_ref is not None and by_sid is not None and by_ref != by_sid:
            # A callback without our ref created a row before the send's SID was journaled.
            return self._merge(keep=by_ref, gone=by_sid, ref=event.ref), event, frozenset()
        return (by_ref if by_ref is not None else by_sid), event, frozenset()

    def _find(self, column: str, value: str | None) -> int | None:
        """The id of the message whose `column` is `value`, from this batch or the table."""
        if value is None:
            return None
        index = self._by_sid if column == "sid" else self._by_ref
        found = index.get(value)
        if found is not None or value in self._absent[column]:
            return found
        row = self._conn.execute(f"{_SELECT} WHERE {column} = ?", (value,)).fetchone()
        if row is None:
            return None
        self._remember(int(row[0]), _state_from_row(row[1:]))
        return int(row[0])

    def _merge(self, *, keep: int, gone: int, ref: str | None) -> int:
        """Move `gone`'s events to `keep` (whose ref is `ref`) and refold `keep` from all of
        them, in order. An event of `gone` that carried another ref had been kept apart for
        it: it stays flagged, and does not bring that ref along."""
        self.flush()  # the SQL below must see this batch's rows
        self._conn.execute("UPDATE message_events SET message_id = ? WHERE message_id = ?",
                           (keep, gone))
        self._conn.execute("DELETE FROM messages WHERE id = ?", (gone,))
        self._forget(gone)
        rows = self._conn.execute(
            f"SELECT {journal_columns('j')} FROM message_events e JOIN journal j"
            " ON j.seq = e.seq WHERE e.message_id = ? ORDER BY j.seq", (keep,)).fetchall()
        events = [event_from_row(JournalRow._make(r)) for r in rows]
        state = fold(e if e.ref in (None, ref) else replace(e, ref=None) for e in events)
        assert state is not None, "the kept message has at least the event that created it"
        if any(e.ref not in (None, ref) for e in events):
            state = replace(state, flags=state.flags | {"ref_conflict"})
        self._remember(keep, state)
        self._pending[keep] = _Pending(state, int(rows[-1][0]), new=False)
        return keep

    # --- the batch's working set

    def _remember(self, message_id: int, state: MessageState) -> None:
        old = self._states.get(message_id)
        if old is not None:
            self._unindex(message_id, old)
        self._states[message_id] = state
        if state.sid is not None:
            self._by_sid[state.sid] = message_id
        if state.ref is not None:
            self._by_ref[state.ref] = message_id

    def _forget(self, message_id: int) -> None:
        state = self._states.pop(message_id, None)
        if state is not None:
            self._unindex(message_id, state)

    def _unindex(self, message_id: int, state: MessageState) -> None:
        if state.sid is not None and self._by_sid.get(state.sid) == message_id:
            del self._by_sid[state.sid]
        if state.ref is not None and self._by_ref.get(state.ref) == message_id:
            del self._by_ref[state.ref]


def _chunks(values: list[str], size: int) -> Iterator[list[str]]:
    """`values` in chunks of at most `size`, each padded (with its last value) to a power
    of two, so a handful of statement texts serve every batch from the statement cache."""
    for start in range(0, len(values), size):
        chunk = values[start:start + size]
        yield chunk + chunk[-1:] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk))


@functools.lru_cache(maxsize=32)
def _lookup(column: str, count: int) -> str:
    return f"{_SELECT} WHERE {column} IN ({', '.join('?' * count)})"


def _state_from_row(row: tuple[object, ...]) -> MessageState:
    (sid, ref, to, from_, mss, body, body_sha256, status, error_code, terminals, flags,
     created_at, updated_at, sent_at, polls, next_poll_at, _poll_from, _last_seq, direction,
     in_reply_to, received_at, media, _media_due) = row
    return MessageState(
        sid=sid, ref=ref, to=to, from_=from_, messaging_service_sid=mss,  # type: ignore[arg-type]
        body=body, body_sha256=body_sha256, status=status,  # type: ignore[arg-type]
        error_code=error_code,  # type: ignore[arg-type]
        terminals=frozenset(json.loads(str(terminals))), flags=frozenset(json.loads(str(flags))),
        created_at=str(created_at), updated_at=str(updated_at),
        sent_at=sent_at, polls=int(str(polls)),  # type: ignore[arg-type]
        next_poll_at=next_poll_at,  # type: ignore[arg-type]
        direction=direction, in_reply_to=in_reply_to,  # type: ignore[arg-type]
        received_at=received_at,  # type: ignore[arg-type]
        media=media_from_json(json.loads(str(media))) if media else (),
    )


def _values(s: MessageState, last_seq: int) -> tuple[object, ...]:
    return (s.sid, s.ref, s.to, s.from_, s.messaging_service_sid, s.body, s.body_sha256,
            s.status, s.error_code, _json_list(s.terminals), _json_list(s.flags),
            s.created_at, s.updated_at, s.sent_at, s.polls, s.next_poll_at, poll_from(s),
            last_seq, s.direction, s.in_reply_to, s.received_at,
            json.dumps([m.as_json() for m in s.media]) if s.media else None,
            media_due(s.media, s.created_at, s.sid))


def _json_list(values: frozenset[str]) -> str:
    return json.dumps(sorted(values)) if values else "[]"
