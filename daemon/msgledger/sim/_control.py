"""The simulator's own control route, for a human at a shell: POST /sim/inbound makes a
customer text one of our numbers (`Simulator.receive_inbound`).

No auth: the simulator is a test tool on loopback, and this route is no part of Twilio's API.
Form fields: From, To, Body, MediaCount (0 to 10 generated PNG and JPEG files) and
Deliver=false (the webhook is lost). Answers 200 with the InboundReport as JSON, or 400
{"error": ...}.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from ._http import Request, Response
from ._inbound import NewInbound
from ._media import MAX_MEDIA, generated_files
from ._simulator import Simulator
from ._wire import json_reply

CONTROL_INBOUND = "/sim/inbound"


def is_control(target: str) -> bool:
    return target.partition("?")[0] == CONTROL_INBOUND


async def control_inbound(sim: Simulator, request: Request) -> Response:
    if request.method != "POST":
        return Response(405, b"", (("Allow", "POST"),))
    form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
    try:
        inbound = parse_inbound(form)
        report = await sim.receive_inbound(inbound)
    except ValueError as error:
        return json_reply(400, {"error": str(error)})
    return json_reply(200, report.as_json())


def parse_inbound(form: Mapping[str, str]) -> NewInbound:
    """The text the form describes; ValueError for a field that is missing or wrong."""
    count, deliver = form.get("MediaCount", "0"), form.get("Deliver", "true").lower()
    if not count.isdigit() or int(count) > MAX_MEDIA:
        raise ValueError(f"MediaCount must be 0 to {MAX_MEDIA}, not {count!r}")
    if deliver not in ("true", "false"):
        raise ValueError(f"Deliver must be true or false, not {deliver!r}")
    if not form.get("From") or not form.get("To"):
        raise ValueError("From and To are required")
    return NewInbound(form["From"], form["To"], form.get("Body", ""),
                      media=generated_files(int(count)), deliver=deliver == "true")

