"""`/healthz` tells a load balancer whether to send traffic: only while serving."""

from __future__ import annotations

from pathlib import Path

import trio

from msgledger.deadlines import AckDeadlines
from msgledger.events import Submission
from msgledger.http.api import ApiDeps, create_app
from msgledger.http.state import ServerState
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics
from msgledger.sender import Sender


async def test_healthz_is_503_while_starting_and_draining(tmp_path: Path) -> None:
    """503 before the daemon is ready and once it drains; 200 only in between."""
    state = ServerState()
    intake, _ = trio.open_memory_channel[Submission](1)
    journal = JournalClient(intake, AckDeadlines(1))
    sender = Sender(journal, None, keep_body="full", public_url=lambda: "")
    app = create_app(ApiDeps(store_path=str(tmp_path / "h.db"), api_token=None, state=state,
                             metrics=Metrics(), sender=sender, journal=journal,
                             overdue_after=60, keep_body="full"))
    client = app.test_client()
    seen = []
    with trio.fail_after(10):
        for ready, draining in ((False, False), (True, False), (True, True)):
            state.ready, state.draining = ready, draining
            response = await client.get("/healthz")
            seen.append((response.status_code, (await response.get_json())["status"]))
    assert seen == [(503, "starting"), (200, "ready"), (503, "draining")]
