"""The HTTP API's contract: `openapi.json` beside this module, an OpenAPI 3 document kept
by hand and shipped in the package, served at `PATH`. `tests/test_openapi.py` holds it and
the running app to each other (routes, methods, status codes, bodies)."""

from __future__ import annotations

from importlib import resources

PATH = "/v1/openapi.json"  # no token: integrators and tools read it before they have one


def document() -> bytes:
    return resources.files(__package__).joinpath("openapi.json").read_bytes()
