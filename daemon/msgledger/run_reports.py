"""The reports of ended reconcile runs, as `GET /v1/reconcile/runs` and `msgledger status`
read them from the journal: each run's `reconcile_run` event, newest first.

A report is what `Run.report()` gave when the run ended (`reconcile/run.py`). One recorded
at start-up for a run an earlier process never ended holds less (its `reconcile_started`
data and how it ended): it reads as a run that read nothing, started when its
`reconcile_started` was journaled. So every report read here has the same keys.

Each query takes the connection it is given (`StoreReads.run`, or the CLI's snapshot).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from .store import _reconcile as queries

Report = dict[str, Any]
RUN_ID = re.compile(r"RN[0-9a-f]{32}")  # as the reconciler makes them: "RN" + token_hex(16)
# What a report recorded from `reconcile_started` alone lacks: a run that read nothing.
NOTHING_READ: Report = {"source": None, "finished_at": None, "duration_s": None,
                        "waited_s": 0.0, "reason": None, "pages": 0, "lines": 0,
                        "last_page": None, "job_sid": None, "counts": {}, "broken": [],
                        "complete": False}


def finished_runs(conn: sqlite3.Connection, limit: int,
                  skip: Iterable[str] = ()) -> list[Report]:
    """The newest `limit` reports of runs not in `skip`, the last to end first."""
    events = queries.iter_run_events(conn)
    seen = set(skip)
    reports: list[Report] = []
    while len(reports) < limit and (event := next(events, None)) is not None:
        run_id = event.data.get("run_id")
        if event.kind == "reconcile_run" and isinstance(run_id, str) and run_id not in seen:
            seen.add(run_id)
            reports.append(_complete(event))
    _add_start_times(reports, events)
    return reports


def finished_run(conn: sqlite3.Connection, run_id: str) -> Report | None:
    """The report of run `run_id`, if it has ended."""
    events = queries.iter_run_events(conn)
    for event in events:
        if event.kind == "reconcile_run" and event.data.get("run_id") == run_id:
            report = _complete(event)
            _add_start_times([report], events)
            return report
    return None


def _complete(event: queries.RunEvent) -> Report:
    report = {**NOTHING_READ, "started_at": None, **event.data}
    report["finished_at"] = report["finished_at"] or event.at
    return report


def _add_start_times(reports: list[Report], older: Iterator[queries.RunEvent]) -> None:
    """Give each report without `started_at` the time of its `reconcile_started`, looked
    for among the `older` events (failing that, its own end)."""
    waiting = {r["run_id"]: r for r in reports if r["started_at"] is None}
    while waiting and (event := next(older, None)) is not None:
        run_id = event.data.get("run_id")
        if event.kind == "reconcile_started" and run_id in waiting:
            waiting.pop(run_id)["started_at"] = event.at
    for report in waiting.values():
        report["started_at"] = report["finished_at"]
