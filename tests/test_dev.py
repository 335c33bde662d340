"""`msgledger run --dev`, the README's run command, works on a fresh store."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import trio

from .conftest import child_env, start_child


async def test_dev_mode_sends_through_its_simulator(tmp_path: Path) -> None:
    """The dev daemon starts with its own simulator and throwaway tokens, sends a message
    through it, and stops cleanly on SIGTERM."""
    env = child_env(tmp_path / "dev.db")  # a real-looking API token in the environment
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, env, "--dev", ready_event="dev_ready",
                                      cwd=tmp_path)
            token = str(child.ready["api_token"])
            assert str(child.ready["try_it"]).endswith(f"{child.url}/v1/messages")
            async with httpx.AsyncClient() as client:
                sent = await client.post(child.url + "/v1/messages",
                                         json={"to": "+15558675310", "from": "+15005550006",
                                               "body": "hi"},
                                         headers={"Authorization": f"Bearer {token}"})
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    assert sent.status_code == 201
    assert sent.json()["sid"].startswith("SM")
    assert token != env["MSGLEDGER_API_TOKEN"]  # never the environment's
    assert env["MSGLEDGER_API_TOKEN"] not in json.dumps(child.lines)
    others = [line for line in child.lines if line.get("event") != "dev_ready"]
    assert token not in json.dumps(others)


async def test_a_taken_port_is_one_log_line_and_exit_4(tmp_path: Path) -> None:
    """When the listener cannot bind, `msgledger run` says so in one line and exits 4."""
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**child_env(tmp_path / "p.db"), "MSGLEDGER_HTTP_LISTEN": f"127.0.0.1:{port}"}
        with trio.fail_after(30):
            result = await trio.run_process([sys.executable, "-m", "msgledger", "run"], env=env,
                                            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 4
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    [failure] = [line for line in lines if line["level"] == "error"]
    assert failure["event"] == "start_failed" and "in use" in failure["error"]
    assert result.stderr == b""
