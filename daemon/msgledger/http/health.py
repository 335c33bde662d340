"""The daemon's readiness, as `/healthz` and systemd report it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Health:
    ready: bool = False  # set once every actor runs and the listener is bound
    draining: bool = False  # set by the first SIGTERM: stop being picked by load balancers

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def describe(self) -> str:
        return "draining" if self.draining else "ready" if self.ready else "starting"
