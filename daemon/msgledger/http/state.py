"""What the HTTP front knows about the daemon: readiness, whether the store commits, and
the URL Twilio calls it at."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio


@dataclass
class ServerState:
    ready: bool = False  # set once every actor runs and the listener is bound
    draining: bool = False  # set by the first SIGTERM: stop being picked by load balancers
    public_url: str | None = None  # http.public_url, or http://<bound address> once bound
    store_problem: str | None = None  # why the journal's last commit failed; None: it commits
    _store_changed: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def describe(self) -> str:
        if self.draining or not self.ready:
            return "draining" if self.draining else "starting"
        return "ready" if self.store_problem is None else "store_failing"

    def health(self) -> tuple[int, dict[str, str]]:
        """What /healthz answers: 200 only while serving with a store that commits."""
        body = {"status": self.describe()}
        if self.store_problem is not None:
            body["reason"] = self.store_problem
        return (200 if self.serving and self.store_problem is None else 503), body

    def report_store(self, problem: str | None) -> None:
        """The journal's word after a batch (or, in a front, the main process's)."""
        if problem != self.store_problem:
            self.store_problem = problem
            self._store_changed.set()
            self._store_changed = trio.Event()

    @property
    def store_changed(self) -> trio.Event:
        """Set at the next change of `store_problem`: take it before reading the problem."""
        return self._store_changed
