"""What the HTTP front knows about the daemon: readiness, whether the store commits, the
poller's state, and the URL Twilio calls it at."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

POLLER_OFF = "off"  # no Twilio credentials: nothing to poll with


@dataclass
class ServerState:
    ready: bool = False  # set once every actor runs and the listener is bound
    draining: bool = False  # set by the first SIGTERM: stop being picked by load balancers
    public_url: str | None = None  # http.public_url, or http://<bound address> once bound
    store_problem: str | None = None  # why the journal's last commit failed; None: it commits
    poller: str = POLLER_OFF  # "running", "paused: <why>", or off: no Twilio credentials
    _health_changed: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def describe(self) -> str:
        if self.draining or not self.ready:
            return "draining" if self.draining else "starting"
        return "ready" if self.store_problem is None else "store_failing"

    def health(self) -> tuple[int, dict[str, str]]:
        """What /healthz answers: 200 only while serving with a store that commits. A paused
        poller is reported but keeps the 200: callbacks are still taken."""
        body = {"status": self.describe(), "poller": self.poller}
        if self.store_problem is not None:
            body["reason"] = self.store_problem
        return (200 if self.serving and self.store_problem is None else 503), body

    def report_store(self, problem: str | None) -> None:
        """The journal's word after a batch (or, in a front, the main process's)."""
        if problem != self.store_problem:
            self.store_problem = problem
            self._changed()

    def report_poller(self, poller: str) -> None:
        """The poller's word on its state (or, in a front, the main process's)."""
        if poller != self.poller:
            self.poller = poller
            self._changed()

    def _changed(self) -> None:
        self._health_changed.set()
        self._health_changed = trio.Event()

    @property
    def health_changed(self) -> trio.Event:
        """Set at the next change of `store_problem` or `poller`: take it before reading
        them."""
        return self._health_changed
