"""Draining on signals, as every msgledger process does it: the first SIGTERM/SIGINT sets
`stop` (stop accepting, finish what is in flight), the second cancels everything."""

from __future__ import annotations

import signal

import trio

from . import systemd
from .http.state import ServerState
from .logs import get_logger

log = get_logger("msgledger.drain")


async def drain_when(stop: trio.Event, state: ServerState) -> None:
    await stop.wait()
    state.draining = True
    systemd.notify("STOPPING=1")
    log.info("drain_started")


async def cancel_when(stop: trio.Event, scope: trio.CancelScope) -> None:
    """Cancel `scope` once `stop` is set: how an actor that loops ends on the drain."""
    await stop.wait()
    scope.cancel()


async def watch_signals(stop: trio.Event, everything: trio.CancelScope) -> None:
    """The first signal sets `stop`; the second cancels `everything`. Signals are counted,
    not inferred from `stop`: a front is also told to drain over its link, and systemd's
    SIGTERM arriving after that is still only the first signal."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        first = True
        async for signum in signals:
            if not first:
                log.warning("drain_abandoned", signal=signal.Signals(signum).name)
                everything.cancel()
                return
            log.info("signal_received", signal=signal.Signals(signum).name)
            stop.set()
            first = False
