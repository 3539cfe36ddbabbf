"""The README's first steps: the shipped example config, unmodified, answers the documented calls.

Only the listen address is chosen here, through the `PORTCULLIS_LISTEN` variable the config reads,
so the test does not depend on port 4000 being free.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import READY_TIMEOUT_S, REPO, TEAM_A_KEY, _binary, stop_gracefully

EXAMPLE_CONFIG = REPO / "config" / "portcullis.yaml"
# A port picked free can be taken again before the gateway binds it; starting again fixes that.
START_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(stderr_path: Path) -> tuple[subprocess.Popen, str] | None:
    """Starts the gateway; returns it and its URL once ready, or None if it exited early."""
    port = _free_port()
    env = dict(os.environ, PORTCULLIS_LISTEN=f"127.0.0.1:{port}", PORTCULLIS_LOG="info")
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [str(_binary()), "--config", str(EXAMPLE_CONFIG)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            if httpx.get(f"{url}/health/readiness", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    process.wait()
    pytest.fail(f"not ready within {READY_TIMEOUT_S:.0f}s\n{stderr_path.read_text(errors='replace')}")


@pytest.fixture
def example_gateway(tmp_path: Path) -> str:
    stderr_path = tmp_path / "stderr.log"
    for _ in range(START_ATTEMPTS):
        started = _start(stderr_path)
        if started is not None:
            break
    else:
        pytest.fail(f"the gateway exited at start\n{stderr_path.read_text(errors='replace')}")
    process, url = started
    yield url
    stop_gracefully(process, lambda: stderr_path.read_text(errors="replace"))


def test_the_shipped_config_answers_the_readme_calls(example_gateway):
    with openai.OpenAI(
        base_url=f"{example_gateway}/v1", api_key=TEAM_A_KEY, max_retries=0, timeout=10
    ) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello, gateway"}]
        )
        assert reply.choices[0].message.content == "Hello, gateway"
        assert reply.model == "gpt-4o-mini"

        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            stream=True,
            messages=[{"role": "user", "content": "Hi there"}],
        )
        chunks = list(stream)
        assert chunks and all(c.model == "gpt-4o-mini" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hi there"
