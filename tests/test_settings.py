"""Configuration: defaults, the TOML file, the environment, and the errors that stop start-up.

Every call passes an explicit `environ`, so the machine's own environment never leaks in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from msgledger import settings
from msgledger.settings import ConfigError

TOKEN = {"TWILIO_AUTH_TOKEN": "0123456789abcdef"}  # enough to start with webhooks on
SID = "AC" + "0123456789abcdef" * 2
MSGLEDGER = Path(sys.executable).with_name("msgledger")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "msgledger.toml"
    path.write_text(text)
    return path


def config_error(path: Path | None = None, environ: dict[str, str] | None = None,
                 **kwargs: object) -> str:
    """The message of the ConfigError that `settings.load` raises."""
    with pytest.raises(ConfigError) as caught:
        settings.load(path, environ=TOKEN if environ is None else environ, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# --- defaults, file, environment


def test_defaults() -> None:
    """With no file and no environment but a token, every key takes its documented default."""
    s = settings.load(None, environ=TOKEN)
    assert (s.http_listen_host, s.http_listen_port) == ("127.0.0.1", 8080)
    assert s.http_public_url is None
    assert s.store_path == "msgledger.db"
    assert s.poller_overdue_after == 43200.0
    assert s.poller_interval == 300.0
    assert s.reconciler_daily_at == "03:30"
    assert s.reconciler_lookback_days == 2
    assert s.http_ack_timeout == 5.0
    assert s.http_max_body_bytes == 65536
    assert s.http_webhooks is True
    assert s.twilio_api_base_url == "https://api.twilio.com"
    assert s.api_token is None
    assert s.twilio_account_sid is None


def test_file_values(tmp_path: Path) -> None:
    """Values in the TOML file replace the defaults, parsed into their types."""
    path = write(tmp_path, f"""
[http]
listen = "0.0.0.0:9000"
public_url = "https://ledger.example.com/"
max_body_bytes = 1024
ack_timeout = "250ms"
[store]
path = "/var/lib/msgledger/ledger.db"
[twilio]
account_sid = "{SID}"
auth_token = "file-token"
[api]
token = "api-secret"
[poller]
overdue_after = "1h30m"
interval = "2s"
[reconciler]
daily_at = "23:59"
lookback_days = 5
""")
    s = settings.load(path, environ={})
    assert (s.http_listen_host, s.http_listen_port) == ("0.0.0.0", 9000)
    assert s.http_public_url == "https://ledger.example.com"
    assert s.http_max_body_bytes == 1024
    assert s.http_ack_timeout == 0.25
    assert s.store_path == "/var/lib/msgledger/ledger.db"
    assert (s.twilio_account_sid, s.twilio_auth_token) == (SID, "file-token")
    assert s.api_token == "api-secret"
    assert (s.poller_overdue_after, s.poller_interval) == (5400.0, 2.0)
    assert (s.reconciler_daily_at, s.reconciler_lookback_days) == ("23:59", 5)


def test_environment_beats_file(tmp_path: Path) -> None:
    """`MSGLEDGER_<SECTION>_<KEY>` overrides the same key in the file."""
    path = write(tmp_path, '[http]\nlisten = "0.0.0.0:9000"\n[poller]\ninterval = "5m"\n')
    s = settings.load(path, environ={**TOKEN, "MSGLEDGER_HTTP_LISTEN": "127.0.0.1:7000",
                                     "MSGLEDGER_POLLER_INTERVAL": "10s",
                                     "MSGLEDGER_RECONCILER_LOOKBACK_DAYS": "7",
                                     "MSGLEDGER_HTTP_WEBHOOKS": "false"})
    assert s.http_listen_port == 7000
    assert s.poller_interval == 10.0
    assert s.reconciler_lookback_days == 7
    assert s.http_webhooks is False


def test_twilio_library_variables_are_read() -> None:
    """`TWILIO_AUTH_TOKEN` and `TWILIO_ACCOUNT_SID` fill the twilio credentials."""
    s = settings.load(None, environ={"TWILIO_AUTH_TOKEN": "lib-token", "TWILIO_ACCOUNT_SID": SID})
    assert (s.twilio_auth_token, s.twilio_account_sid) == ("lib-token", SID)


def test_msgledger_variables_beat_twilio_variables() -> None:
    """The MSGLEDGER_ form of a credential wins over the twilio library's variable."""
    other_sid = "AC" + "f" * 32
    s = settings.load(None, environ={
        "TWILIO_AUTH_TOKEN": "lib-token", "MSGLEDGER_TWILIO_AUTH_TOKEN": "our-token",
        "TWILIO_ACCOUNT_SID": SID, "MSGLEDGER_TWILIO_ACCOUNT_SID": other_sid})
    assert (s.twilio_auth_token, s.twilio_account_sid) == ("our-token", other_sid)


@pytest.mark.parametrize(("text", "seconds"), [
    ("12h", 43200.0), ("5m", 300.0), ("2s", 2.0), ("250ms", 0.25), ("1h30m", 5400.0),
    (" 1d ", 86400.0),
])
def test_durations(text: str, seconds: float) -> None:
    """Durations are numbers with ms/s/m/h/d units, and units may be chained."""
    assert settings.parse_duration(text) == seconds


# --- errors name the key


@pytest.mark.parametrize(("toml", "key"), [
    ('[http]\nlisen = "127.0.0.1:1"\n', "http.lisen"),
    ('[poller]\noverdue_after = "12 hours"\n', "poller.overdue_after"),
    ("[poller]\ninterval = 300\n", "poller.interval"),
    ('[http]\nack_timeout = "5"\n', "http.ack_timeout"),
    ('[http]\nack_timeout = "0s"\n', "http.ack_timeout"),
    ('[poller]\ninterval = "0m"\n', "poller.interval"),
    ('[http]\nlisten = "localhost"\n', "http.listen"),
    ("[http]\nworkers = 0\n", "http.workers"),
    ('[http]\nworkers = "two"\n', "http.workers"),
    ('[http]\nlisten = "127.0.0.1:70000"\n', "http.listen"),
    ('[http]\nlisten = ":8080"\n', "http.listen"),
    ('[http]\npublic_url = "https://ledger.example.com/twilio"\n', "http.public_url"),
    ('[http]\npublic_url = "ftp://ledger.example.com"\n', "http.public_url"),
    ('[http]\npublic_url = "ledger.example.com"\n', "http.public_url"),
    ('[http]\npublic_url = "https://ledger.example.com?x=1"\n', "http.public_url"),
    ('[http]\nmax_body_bytes = 0\n', "http.max_body_bytes"),
    ('[reconciler]\ndaily_at = "3:30"\n', "reconciler.daily_at"),
    ('[reconciler]\nlookback_days = "two"\n', "reconciler.lookback_days"),
    ('[twilio]\naccount_sid = "AC123"\n', "twilio.account_sid"),
    ('[twilio]\naccount_sid = "SM0123456789abcdef0123456789abcdef"\n', "twilio.account_sid"),
    ('[store]\nkeep_body = "some"\n', "store.keep_body"),
    ('[store]\npath = ""\n', "store.path"),
    ('[store]\npath = ":memory:"\n', "store.path"),
    ('[store]\npath = "file:ledger.db?mode=memory"\n', "store.path"),
    ('[http]\nworkers = 65\n', "http.workers"),
    ('[http]\npublic_url = "https://user:secret@ledger.example.com"\n', "http.public_url"),
    ('[http]\nread_timeout = "0s"\n', "http.read_timeout"),
    ('[store]\ncheckpoint_interval = "soon"\n', "store.checkpoint_interval"),
    ('[store]\nkeep_media = "bytes"\n', "store.keep_media"),
    ("[store]\nmax_media_bytes = 0\n", "store.max_media_bytes"),
    ('[inbound]\nforward_url = "app.internal/sms"\n', "inbound.forward_url"),
    ('[inbound]\nforward_url = "ftp://app.internal/sms"\n', "inbound.forward_url"),
    ('[inbound]\nforward_url = "https://app.internal/sms#x"\n', "inbound.forward_url"),
    ('[inbound]\nforward_url = "https://app.internal:0x50/sms"\n', "inbound.forward_url"),
    ('[inbound]\nforward_url = ""\n', "inbound.forward_url"),
    ('[inbound]\nforward_timeout = "15s"\n', "inbound.forward_timeout"),
    ('[inbound]\nforward_timeout = "0s"\n', "inbound.forward_timeout"),
])
def test_bad_file_value_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    """A wrong key or value in the file raises ConfigError whose message starts with the key."""
    assert config_error(write(tmp_path, toml)).startswith(f"{key}:")


def test_unknown_section_names_it(tmp_path: Path) -> None:
    """A section the schema does not know is refused by name."""
    assert "[htpp]" in config_error(write(tmp_path, '[htpp]\nlisten = "x:1"\n'))


def test_top_level_key_is_refused(tmp_path: Path) -> None:
    """A key outside any section is refused by name."""
    assert config_error(write(tmp_path, 'listen = "127.0.0.1:1"\n')).startswith("listen:")


def test_unknown_environment_variable_names_it() -> None:
    """A MSGLEDGER_ variable that matches no key is refused by name (a typo must not pass)."""
    message = config_error(environ={**TOKEN, "MSGLEDGER_HTTP_LISEN": "127.0.0.1:1"})
    assert message.startswith("MSGLEDGER_HTTP_LISEN:")


def test_bad_environment_value_names_the_key() -> None:
    """A malformed value from the environment is reported under its [section] key."""
    message = config_error(environ={**TOKEN, "MSGLEDGER_POLLER_OVERDUE_AFTER": "soon"})
    assert message.startswith("poller.overdue_after:")


def test_bad_twilio_variable_names_the_key() -> None:
    """A malformed TWILIO_ACCOUNT_SID is reported as twilio.account_sid."""
    message = config_error(environ={**TOKEN, "TWILIO_ACCOUNT_SID": "not-a-sid"})
    assert message.startswith("twilio.account_sid:")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that cannot be read raises ConfigError naming the file."""
    missing = tmp_path / "absent.toml"
    assert str(missing) in config_error(missing)
    assert str(tmp_path) in config_error(tmp_path)  # a directory is not a file either


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not TOML raises ConfigError naming the file."""
    path = write(tmp_path, "[http\nlisten = \n")
    message = config_error(path)
    assert str(path) in message and "TOML" in message


def test_auth_token_required_while_webhooks_on() -> None:
    """Without an auth token the daemon refuses to start, since it could check no signature."""
    assert config_error(environ={}).startswith("twilio.auth_token:")


def test_auth_token_optional_without_webhooks() -> None:
    """With webhooks off, or for the offline commands, no auth token is needed."""
    assert settings.load(None, environ={"MSGLEDGER_HTTP_WEBHOOKS": "false"}).http_webhooks is False
    assert settings.load(None, environ={}, require_secrets=False).twilio_auth_token is None


def test_overrides_sit_between_file_and_environment(tmp_path: Path) -> None:
    """`overrides` beat the file and the environment beats `overrides`."""
    path = write(tmp_path, '[http]\nlisten = "0.0.0.0:9000"\n[api]\ntoken = "file"\n')
    s = settings.load(path, environ={**TOKEN, "MSGLEDGER_API_TOKEN": "env"},
                      overrides={"http": {"listen": "127.0.0.1:9001"}, "api": {"token": "ovr"}})
    assert (s.http_listen_port, s.api_token) == (9001, "env")


@pytest.mark.parametrize("url", ["https://ledger.example.com:99999",
                                 "https://ledger.example.com:https"])
def test_public_url_with_bad_port_is_refused(url: str) -> None:
    """A public_url whose port is not a number in 0-65535 is refused at start-up."""
    message = config_error(environ={**TOKEN, "MSGLEDGER_HTTP_PUBLIC_URL": url})
    assert message.startswith("http.public_url:")


# --- the command-line contract


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MSGLEDGER_", "TWILIO_"))}


def test_run_with_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """`msgledger run --config bad.toml` exits 2 with exactly one stderr line naming the key."""
    path = write(tmp_path, '[poller]\ninterval = "often"\n')
    done = subprocess.run([str(MSGLEDGER), "run", "--config", str(path)], env=clean_environ(),
                          capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "poller.interval" in lines[0]
    assert done.stdout == ""
    assert not (tmp_path / "msgledger.db").exists()


def test_public_url_is_required_beyond_loopback() -> None:
    """Listening on a public address without http.public_url would refuse every signature
    quietly; start-up refuses instead, naming the key."""
    base = {"MSGLEDGER_TWILIO_AUTH_TOKEN": "t", "MSGLEDGER_HTTP_LISTEN": "0.0.0.0:8080"}
    with pytest.raises(settings.ConfigError, match=r"^http\.public_url"):
        settings.load(None, environ=base)
    given = settings.load(None, environ={**base,
                                         "MSGLEDGER_HTTP_PUBLIC_URL": "https://l.example.com"})
    assert given.http_public_url == "https://l.example.com"
    off = settings.load(None, environ={**base, "MSGLEDGER_HTTP_WEBHOOKS": "false"})
    assert off.http_webhooks is False


def test_credentials_in_public_url_are_refused_unprinted(tmp_path: Path) -> None:
    """A public_url carrying user:password@ is refused, and the password is not echoed."""
    message = config_error(write(tmp_path, '[http]\npublic_url = "https://u:s3cret@x.example"\n'))
    assert "s3cret" not in message and "user:password" in message


def test_credentials_in_forward_url_are_refused_unprinted(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, '[inbound]\nforward_url = "https://u:s3cret@app"\n'))
    assert message.startswith("inbound.forward_url:") and "s3cret" not in message


def test_forwarding_must_fit_in_twilios_fifteen_seconds() -> None:
    message = config_error(None, {**TOKEN, "MSGLEDGER_INBOUND_FORWARD_URL": "https://app/sms",
                                  "MSGLEDGER_INBOUND_FORWARD_TIMEOUT": "10s"})
    assert message.startswith("inbound.forward_timeout: at most 9s with http.ack_timeout 5s")
    fits = settings.load(None, environ={**TOKEN, "MSGLEDGER_HTTP_ACK_TIMEOUT": "2s",
                                        "MSGLEDGER_INBOUND_FORWARD_URL": "https://app/sms",
                                        "MSGLEDGER_INBOUND_FORWARD_TIMEOUT": "11s"})
    assert fits.inbound_forward_timeout == 11.0


def test_the_inbound_keys_default_and_parse(tmp_path: Path) -> None:
    defaults = settings.load(None, environ=TOKEN)
    assert (defaults.inbound_forward_url, defaults.inbound_forward_timeout) == (None, 8.0)
    assert (defaults.store_keep_media, defaults.store_max_media_bytes) == ("full", 5242880)
    given = settings.load(None, environ={
        **TOKEN, "MSGLEDGER_INBOUND_FORWARD_URL": "https://app.internal:8443/sms?desk=2",
        "MSGLEDGER_INBOUND_FORWARD_TIMEOUT": "9s", "MSGLEDGER_STORE_KEEP_MEDIA": "hash"})
    assert given.inbound_forward_url == "https://app.internal:8443/sms?desk=2"
    assert (given.inbound_forward_timeout, given.store_keep_media) == (9.0, "hash")


def test_config_file_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is a ConfigError naming the file, not a traceback."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[http]\nlisten = "caf\xe9:1"\n')
    assert config_error(path).startswith(f"{path}: not UTF-8")
