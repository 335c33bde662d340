"""The HTTP API's contract: `openapi.json` beside this module, an OpenAPI 3 document kept
by hand and shipped in the package, served at `PATH`. `tests/test_openapi.py` holds it and
the running app to each other (routes, methods, status codes, bodies)."""

from __future__ import annotations

import re
from importlib import resources

PATH = "/v1/openapi.json"  # no token: integrators and tools read it before they have one
# What Quart routes to /v1: werkzeug merges repeated slashes, so "//v1" gets there too.
_API_PATH = re.compile(r"/+v1(/|$)")


def is_api_path(path: str) -> bool:
    """A path Quart serves from the `/v1` API (the contract included)."""
    return _API_PATH.match(path) is not None


def document() -> bytes:
    return resources.files(__package__).joinpath("openapi.json").read_bytes()
