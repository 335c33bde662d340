"""What the HTTP front knows about the daemon: readiness and the URL Twilio calls it at."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerState:
    ready: bool = False  # set once every actor runs and the listener is bound
    draining: bool = False  # set by the first SIGTERM: stop being picked by load balancers
    public_url: str | None = None  # http.public_url, or http://<bound address> once bound

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def describe(self) -> str:
        return "draining" if self.draining else "ready" if self.ready else "starting"
