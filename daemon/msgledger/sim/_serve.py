"""`serve_sim`: the simulator on a real socket, for the real `twilio` client to talk to."""

from __future__ import annotations

from functools import partial

import trio

from ._app import handle_api
from ._callbacks import open_callback_sender
from ._http import serve_connection
from ._knobs import SimKnobs
from ._simulator import Simulator, open_simulator


async def serve_sim(
    knobs: SimKnobs,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the simulated Messages API until cancelled; `started(sim)` once it listens.

    Point a client at it with `client.api.base_url = sim.base_url`. Port 0 picks a free port.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with (
        open_callback_sender() as deliver,
        open_simulator(knobs, base_url=_base_url(listeners[0]), deliver=deliver) as sim,
        trio.open_nursery() as server,
    ):
        handler = partial(serve_connection, handler=partial(handle_api, sim))
        await server.start(trio.serve_listeners, handler, listeners)
        task_status.started(sim)


def _base_url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
