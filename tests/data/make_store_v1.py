"""Writes tests/data/store-v1.db with msgledger's schema-1 writer, for the upgrade test.

Run it with the schema-1 code, the last commit before schema 2:
    git worktree add /tmp/v1 44ec3ac
    PYTHONPATH=/tmp/v1/daemon python tests/data/make_store_v1.py tests/data/store-v1.db
"""

import sys

from msgledger.events import Event
from msgledger.store import JournalWriter


def sid(n: int) -> str:
    return f"SM{n:032x}"


def at(day: int, hour: int) -> str:
    return f"2026-11-{day:02d}T{hour:02d}:00:00.000000+00:00"


def callback(n: int, day: int, hour: int, status: str, *extra: list[str]) -> Event:
    params = [["MessageSid", sid(n)], ["MessageStatus", status], *extra]
    return Event("callback", "callback", at(day, hour), sid=sid(n), status=status,
                 data={"params": params})


EVENTS = [
    # 1: sent and never final; 2: delivered; 3: a send whose outcome is unknown (no SID);
    # 4: a callback-only message with a status nobody ranks; 5: undelivered; 6: queued
    Event("send_requested", "api", at(1, 1), ref="r1", status="requested",
          data={"to": "+15005550001", "body_sha256": "x"}),
    Event("send_accepted", "api", at(1, 2), sid=sid(1), ref="r1", status="queued",
          data={"sid": sid(1), "status": "queued"}),
    callback(1, 1, 3, "sent"),
    Event("register", "register", at(2, 1), sid=sid(2), status="sent",
          data={"to": "+15005550002"}),
    callback(2, 2, 2, "delivered"),
    Event("send_requested", "api", at(3, 1), ref="r3", status="requested",
          data={"to": "+15005550003"}),
    Event("send_unknown", "api", at(3, 2), ref="r3", status="outcome_unknown",
          data={"reason": "timeout", "attempts": 1}),
    callback(4, 4, 1, "partially_delivered"),
    Event("register", "register", at(5, 1), sid=sid(5), status="sent", data={}),
    callback(5, 5, 2, "undelivered", ["ErrorCode", "30003"]),
    Event("register", "register", at(6, 1), sid=sid(6), status="queued", data={}),
    Event("debugger", "debugger", at(6, 2), data={"Sid": "NO123"}),
]

if __name__ == "__main__":
    writer = JournalWriter.open(sys.argv[1])
    writer.append(EVENTS)
    writer.close()
