"""`msgledger run --dev`: the daemon wired to a local Twilio simulator, for a first look.

One process, loopback only, throwaway credentials: the simulator plays Twilio (the API the
daemon sends through, the signed status callbacks it posts back, and texts from customers
posted to the daemon's /twilio/inbound), so a newcomer sees messages sent, called back,
received and recorded without a Twilio account.
"""

from __future__ import annotations

import dataclasses
import secrets
from functools import partial

import trio

from . import main
from .logs import get_logger
from .settings import ConfigError, Settings, is_loopback
from .sim import SimKnobs, serve_sim

log = get_logger("msgledger.dev")
DEV_STEP_DELAY = (0.5, 3.0)  # seconds between statuses: slow enough to watch them change


DEV_STORE = "msgledger-dev.db"  # simulated messages never land in a real ledger


def dev_overrides() -> dict[str, dict[str, object]]:
    """Defaults for a trial: loopback, its own store. File and environment may change them."""
    return {"http": {"listen": "127.0.0.1:8080"}, "store": {"path": DEV_STORE},
            "twilio": {"auth_token": "replaced-by-throwaway-credentials"}}


def throwaway_credentials(settings: Settings) -> Settings:
    """Fresh credentials over whatever the environment holds, so a real token is never
    used, or printed, by a trial; and a refusal to listen beyond loopback."""
    if not is_loopback(settings.http_listen_host):
        raise ConfigError(
            f"http.listen: --dev listens on loopback only, not {settings.http_listen_host}")
    return dataclasses.replace(
        settings, twilio_auth_token=secrets.token_hex(16),
        twilio_account_sid="AC" + secrets.token_hex(16), api_token=secrets.token_urlsafe(18),
        http_public_url=None)


async def run_dev(settings: Settings) -> None:
    """Start the simulator, then the daemon pointed at it; stop both on SIGTERM/SIGINT."""
    assert settings.twilio_account_sid and settings.twilio_auth_token
    knobs = SimKnobs(settings.twilio_account_sid, settings.twilio_auth_token,
                     step_delay=DEV_STEP_DELAY)
    async with trio.open_nursery() as outer:
        sim = await outer.start(partial(serve_sim, knobs))
        wired = dataclasses.replace(settings, twilio_api_base_url=sim.base_url)
        async with trio.open_nursery() as inner:
            running = await inner.start(main.run, wired)
            # Texts "received" by the simulator go to the daemon's webhook, now it listens.
            sim.knobs = dataclasses.replace(sim.knobs, inbound_url=running.url + "/twilio/inbound")
            log.info("dev_ready", simulator=sim.base_url, api_token=settings.api_token,
                     try_it=_example(running.url, str(settings.api_token)),
                     try_inbound=_inbound_example(sim.base_url))
        outer.cancel_scope.cancel()  # the daemon has drained and stopped: so does Twilio


def _inbound_example(sim_url: str) -> str:
    """A customer texting our number, with a picture: the simulator's control route."""
    return ("curl -s --data-urlencode From=+15558675310 --data-urlencode To=+15005550006"
            f" -d Body=hello -d MediaCount=1 {sim_url}/sim/inbound")  # -d would make + a space


def _example(url: str, token: str) -> str:
    return (f"curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json'"
            f" -d '{{\"to\": \"+15558675310\", \"from\": \"+15005550006\", \"body\": \"hello\"}}'"
            f" {url}/v1/messages")
