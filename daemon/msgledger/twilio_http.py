"""The HTTP client under msgledger's `twilio` clients: urllib3's connection pool, plugged in
through twilio's own extension point (`twilio.http.HttpClient`).

The stock `TwilioHttpClient` goes through `requests`, whose per-request work (preparing the
request, merging the session's settings, re-reading the proxy variables from the
environment every time) cost 0.85 ms of CPU a fetch here against 0.34 ms through urllib3
alone (`bench/README.md`, "The HTTP client"). At hundreds of fetches a second under one
GIL that is most of a core. What `requests` decided from the environment is decided once
here instead, when the pool is made, for the one base URL every request goes to:

- the proxy: `https_proxy`/`http_proxy` (or `all_proxy`) unless `no_proxy` covers the
  host, found by `requests`' own functions (`get_environ_proxies`, `select_proxy`), with a
  proxy URL's credentials sent as `Proxy-Authorization` as `requests` does;
- the CA bundle: `REQUESTS_CA_BUNDLE` or `CURL_CA_BUNDLE` if set, else certifi's
  (`requests.utils.DEFAULT_CA_BUNDLE_PATH`), which is what `requests` verifies against.

Failures are urllib3's exceptions (every one an `urllib3.exceptions.HTTPError`), raised at
once: no retries here, `twilio_api` decides what may be retried.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import urllib3
from requests.utils import (
    DEFAULT_CA_BUNDLE_PATH,
    get_auth_from_url,
    get_environ_proxies,
    prepend_scheme_if_needed,
    select_proxy,
)
from twilio.http import HttpClient
from twilio.http.response import Response

_logger = logging.getLogger("twilio.http_client")
_JSON_TYPES = ("application/json", "application/scim+json")
MAX_ROUTES = 64  # hosts whose proxy is remembered


class PooledHttpClient(HttpClient):  # type: ignore[misc]  # twilio ships no types
    """A twilio `HttpClient` on urllib3 pools shared by every thread's twilio client
    (urllib3's pools are thread-safe): one a proxy, each host taken through the proxy
    `requests` would take it through (the API, Bulk Export and its download links may be
    told apart by `no_proxy`), decided once a host."""

    def __init__(self, base_url: str, *, timeout: float, connections: int) -> None:
        super().__init__(_logger, False, timeout)
        self._connections = connections
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._lock = threading.Lock()  # worker threads share the two maps
        self._routes: dict[str, str | None] = {}  # scheme://host:port -> its proxy
        self._pools: dict[str | None, urllib3.PoolManager] = {}  # proxy URL -> its pool
        self.pool_for(base_url)  # the API's route at once: a proxy urllib3 refuses fails here

    def pool_for(self, url: str) -> urllib3.PoolManager:
        """The pool for a request to `url`."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            if origin not in self._routes:
                if len(self._routes) >= MAX_ROUTES:  # hosts from answers: keep it bounded
                    self._routes.clear()
                self._routes[origin] = proxy_for(url)
            proxy = self._routes[origin]
            if proxy not in self._pools:
                self._pools[proxy] = pool_through(proxy, connections=self._connections)
            return self._pools[proxy]

    def request(self, method: str, url: str, params: dict[str, object] | None = None,
                data: dict[str, object] | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None, timeout: float | None = None,
                allow_redirects: bool = False) -> Response:
        """One request, as `TwilioHttpClient.request` makes it with `requests`: query from
        `params`, a form body from `data` (JSON if the headers say so), basic auth."""
        headers = dict(headers or {})
        if auth is not None:
            headers.update(urllib3.make_headers(basic_auth=f"{auth[0]}:{auth[1]}"))
        if query := _encoded(params):
            url = f"{url}{'&' if '?' in url else '?'}{query}"
        body = _body(method, data, headers)
        answer = self.pool_for(url).request(
            method.upper(), url, body=body, headers=headers, redirect=allow_redirects,
            retries=False, preload_content=True,
            timeout=self._timeout if timeout is None else urllib3.Timeout(timeout))
        text = answer.data.decode("utf-8", errors="replace")
        return Response(answer.status, text, answer.headers)


def pool_through(proxy: str | None, *, connections: int) -> urllib3.PoolManager:
    """A pool of up to `connections` kept connections a host, through `proxy` if any,
    verifying TLS against what `requests` would."""
    bundle = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
              or DEFAULT_CA_BUNDLE_PATH)
    where = "ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"
    options: dict[str, Any] = {"maxsize": connections, where: bundle}
    if proxy is None:
        return urllib3.PoolManager(**options)
    user, password = get_auth_from_url(proxy)
    if user or password:  # requests sends a proxy URL's credentials as Proxy-Authorization
        options["proxy_headers"] = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")
    return urllib3.ProxyManager(proxy, **options)


def proxy_for(url: str) -> str | None:
    """The proxy `requests` would take `url` through, from the environment (`https_proxy`,
    `all_proxy`... unless `no_proxy` covers the host; `http://` if it names no scheme),
    or None."""
    proxy = select_proxy(url, get_environ_proxies(url))
    return prepend_scheme_if_needed(proxy, "http") if proxy else None


def _encoded(values: Mapping[str, object] | None) -> str:
    """`values` as a query or form, a list as repeated keys, None left out (as requests)."""
    if not values:
        return ""
    return urlencode({k: v for k, v in values.items() if v is not None}, doseq=True)


def _body(method: str, data: Mapping[str, object] | None,
          headers: dict[str, str]) -> bytes | None:
    if method.upper() in ("GET", "DELETE") and not data:
        return None
    if headers.get("Content-Type") in _JSON_TYPES:
        return json.dumps(data).encode()
    headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    return _encoded(data).encode()
